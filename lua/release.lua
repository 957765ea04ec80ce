#!lua
--[[
  release.lua: give back a fill lease, only if the caller still holds it (compare and delete).

  A lease is `SET <ns>:{<tag>}:lease:<id> <token> NX PX <ms>`, taken by the process that will compute
  a missing value: get.lua takes it with the miss (get_or_set), lease.lua for prewarming; others wait
  for the value or for the lease to end. If the holder dies, the lease simply expires.

  KEYS[1]  <ns>:{<tag>}:lease:<id>   STRING  the holder's token
  ARGV[1]  token, the caller's random token (non-empty)

  Reply: 1 if the caller held the lease and it was deleted, else 0
]]
local lease_key, token = KEYS[1], ARGV[1]
if token == nil or string.len(token) == 0 then
  return redis.error_reply('VRC_BADARG release: the token must be non-empty')
end
if redis.call('GET', lease_key) == token then
  redis.call('DEL', lease_key)
  return 1
end
return 0
