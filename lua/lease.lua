#!lua
--[[
  lease.lua: the step after a miss that will compute the value (get_or_set, prewarming): look at the
  entry once more, on its own server, and if it is still missing take its fill lease, atomically.

  The caller's plain read missed; another process may have filled the entry since. If the entry is
  live now, its fields come back (a hit: nothing is written); otherwise an index member whose data is
  gone is removed, and the caller tries to take the lease. The reply's `now` is the server's clock,
  which the fill then passes as `since_ms`: put.lua refuses it if the entry changed at or after it.
  The usual miss (nothing indexed, no data) writes nothing but the lease, so it skips the shard's
  permission and byte-total checks (check_shard), which a call that removes something first makes.

  KEYS[1]     the shard's l2 key; the shard's other keys derive from it (see includes/shard.lua)
  ARGV[1..7]  the common header (now ms, capacities, idle ttls ms, promote_after, memory ms)
  ARGV[8]     entry id
  ARGV[9]     token, the caller's random token (non-empty); the lease is <ns>:{<tag>}:lease:<id>
  ARGV[10]    lease time to live, ms (>= 1)
  ARGV[11]    (optional) the `ver` field of an entry the caller found corrupt: if the entry still has
              it, it is removed (and fenced) first, as a reader's report would have it removed

  Reply: {live, taken, pttl_ms, now_ms, payload, ver, tier, n, expiry_ms, cost_ms, prewarmed, step, kept_ms}
    live = 1: the entry is served now (the fields after now_ms are its own, as a plain read gets them:
              v ver t n x d w e z; nothing was written)
    live = 0: taken = 1 if the caller now holds the lease, 0 if someone else does; pttl_ms = the
              lease's time to live (-1: no expiry, a lease written by hand)
]]
-- @include "includes/shard.lua"

local err = parse_head() or check_shard_types()
if err then return redis.error_reply(err) end
local id, token, lease_ms, disregard = ARGV[HEAD + 1], ARGV[HEAD + 2], arg_int(HEAD + 3, 1), ARGV[HEAD + 4]
if (#ARGV ~= HEAD + 3 and #ARGV ~= HEAD + 4) or not id or string.len(id) == 0 or string.len(token or '') == 0
    or not lease_ms then
  return redis.error_reply('VRC_BADARG lease needs an entry id, a non-empty token, a lease ttl >= 1 ms and '
      .. 'optionally the ver of an entry to disregard')
end

local ek = entry_key(id)
local lease_key = base .. 'lease:' .. id
local function take_lease()
  local taken = redis.call('SET', lease_key, token, 'NX', 'PX', lease_ms) and 1 or 0
  return {0, taken, redis.call('PTTL', lease_key), now}
end

local tier, touched = tier_of(id)
local f = read_fields(ek, 'v', 'ver', 't', 'n', 'x', 'd', 'w', 'e', 'z')   -- nil: a key of another type
local corrupt = f and f[1] and disregard and (f[2] or '') == disregard
if tier and f and f[1] and not corrupt then
  local expiry = tonumber(f[5])                      -- served until then
  local ends = deadline(tier, touched, expiry)
  if not (ends and now >= ends) then
    return {1, 0, 0, now, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9]}
  end
end
if not tier and f and not f[1] then
  -- The usual miss: nothing indexed, no data. The lease is the call's one write, so no check can fail
  -- after an earlier write: the permission checks and the byte totals' are not needed.
  return take_lease()
end

-- Something to remove first: the shard's full checks, before the first write.
err = check_shard(true)
if err then return redis.error_reply(err) end
if f == nil then redis.call('DEL', ek) end           -- written by hand with another type: simply gone
if corrupt then
  drop(id, tier, 'corrupt')                          -- the caller found it is not a value the cache wrote
elseif tier and f and f[1] then
  -- Not served any more. Past its ttl but inside its fail-safe grace (z), it stays: a loader that
  -- fails may fall back on it; the fill replaces it.
  local expiry = tonumber(f[5])
  local ends = deadline(tier, touched, expiry)
  local removal = tonumber(redis.call('ZSCORE', exp_key, id))
  local idle_end = deadline(tier, touched, nil)
  if (idle_end and now >= idle_end) or not (removal and now < removal) then
    drop(id, tier, expiry and now >= expiry and 'expired' or 'idle', ends)
  end
elseif tier then
  drop(id, tier, 'vanished', tonumber(redis.call('ZSCORE', exp_key, id)))
end
local reply = take_lease()
finish({})
return reply
