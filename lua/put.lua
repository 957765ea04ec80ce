--[[
  put.lua: write entries of one shard into L2 (new version, hit count 0), then enforce the bounds.

  KEYS[1..4]  the shard's l2, l3, exp and stats keys (see includes/shard.lua)
  ARGV[1..8]  the common header (now ms, capacities, idle ttls ms, promote_after, L1 deltas)
  ARGV[9..]   groups of four, one group per entry:
                id           entry id
                payload      encoded value, bytes (non-empty)
                ttl_ms       absolute time to live, ms (0 = none)
                key          the original key when id is its hash, else empty

  A previous entry under the same id, in L2 or L3, is replaced. Absolute expiry is enforced by the
  scripts (never served at or after it; swept away by later calls on the shard), not by a Redis
  PEXPIRE: Redis deleting the data behind the scripts' back would lose its accounted size.

  Reply: { {promotions, demotions, evictions, expirations}, version_1, version_2, ... }
]]
-- @include "includes/shard.lua"

local err = check_head()
if err then return redis.error_reply(err) end
local n_args = #ARGV - HEAD
if n_args < 4 or n_args % 4 ~= 0 then
  return redis.error_reply('VRC_BADARG put needs groups of (id, payload, ttl_ms, key)')
end
for i = HEAD + 1, #ARGV, 4 do
  if string.len(ARGV[i]) == 0 or string.len(ARGV[i + 1]) == 0 or not arg_int(i + 2, 0) then
    return redis.error_reply('VRC_BADARG put: empty id or payload, or ttl_ms not a non-negative integer')
  end
end

sweep()

-- Versions grow across a flushed or restarted Redis: a new shard's counter starts at now (ms) * 1000.
redis.call('HSETNX', stats_key, 'seq', now * 1000)
local versions = {}
for i = HEAD + 1, #ARGV, 4 do
  local id, payload, ttl, key = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local ek = entry_key(id)
  if redis.call('ZSCORE', l2_key, id) then drop(id, 2)
  elseif redis.call('ZSCORE', l3_key, id) then drop(id, 3)
  else drop(id, nil) end
  local version = redis.call('HINCRBY', stats_key, 'seq', 1)
  redis.call('HSET', ek, 'v', payload, 's', string.len(payload), 'n', 0, 'ver', version)
  if key ~= '' then redis.call('HSET', ek, 'k', key) end
  if ttl > 0 then
    redis.call('HSET', ek, 'x', now + ttl)
    redis.call('ZADD', exp_key, now + ttl, id)
  end
  redis.call('ZADD', l2_key, stamp(), id)
  bytes2 = bytes2 + string.len(payload)
  versions[#versions + 1] = version
end

enforce_bounds()
table.insert(versions, 1, flush_stats({puts = #versions}))
return versions
