#!lua
--[[
  lease.lua: before prewarming an entry, take its fill lease and look at the entry, on the entry's own
  server: whether it is live (present and not past its absolute expiry) and that server's clock, which
  the fill then uses as `since_ms` (a fill is refused if the entry changed at or after it).

  KEYS[1]  <ns>:{<tag>}:lease:<id>   STRING  the fill lease (see release.lua)
  KEYS[2]  <ns>:{<tag>}:e:<id>       HASH    the entry (see includes/shard.lua)
  KEYS[3]  <ns>:{<tag>}:l2           ZSET    the shard's L2 index (last touch, ms)
  KEYS[4]  <ns>:{<tag>}:l3           ZSET    the shard's L3 index (last touch, ms)
  ARGV[1]  token, the caller's random token (non-empty)
  ARGV[2]  lease time to live, ms (>= 1)
  ARGV[3]  now, ms since the epoch; 0 = the server's TIME (tests pass a fake clock)
  ARGV[4]  L2 idle ttl, ms (0 = never)
  ARGV[5]  L3 idle ttl, ms (0 = never)

  Reply: {taken, live, now_ms}
    taken = 1 if the caller now holds the lease, 0 if someone else does (nothing written)
    live  = 1 if the entry would be served: indexed, holding a value, not past its absolute expiry
            and not idle past its tiers' ttls; a caller that took the lease of a live entry gives it
            back (release.lua)
]]
-- @include "includes/acl.lua"

local lease_key, entry_key, l2_key, l3_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token = ARGV[1]
local function whole(i, min)
  local v = tonumber(ARGV[i])
  if v == nil or v ~= math.floor(v) or v < min or v > 9007199254740992 then return nil end
  return v
end
local lease_ms, now, idle2, idle3 = whole(2, 1), whole(3, 0), whole(4, 0), whole(5, 0)
if #KEYS ~= 4 or string.sub(entry_key, 1, #l2_key) ~= string.sub(l2_key, 1, -3) .. 'e:' or token == nil or string.len(token) == 0 or not (lease_ms and now and idle2 and idle3) then
  return redis.error_reply('VRC_BADARG lease: a non-empty token, a lease ttl >= 1 ms, now and idle ttls >= 0, '
      .. 'all whole numbers')
end
local denied = check_commands({'set', 'type', 'hmget', 'zscore', 'time'}, KEYS[1], nil)
if denied then return redis.error_reply(denied) end

if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local taken = redis.call('SET', lease_key, token, 'NX', 'PX', lease_ms) and 1 or 0
local live = 0
local id = string.sub(entry_key, #l2_key + 1)   -- entry keys are <l2 key without 'l2'> .. 'e:' .. id
local s2, s3 = tonumber(redis.call('ZSCORE', l2_key, id)), nil
if not s2 then s3 = tonumber(redis.call('ZSCORE', l3_key, id)) end
if s2 and idle2 > 0 then s3 = s2 + idle2; if now < s3 then s3 = nil end end   -- idle in L2: in L3 since s3
if (s2 or s3) and redis.call('TYPE', entry_key).ok == 'hash' then
  local f = redis.call('HMGET', entry_key, 'v', 'x')
  local expiry = tonumber(f[2])
  local dead = (expiry and now >= expiry) or (s3 and idle3 > 0 and now - s3 >= idle3)
  if f[1] and not dead then live = 1 end
end
return {taken, live, now}
