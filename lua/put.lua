#!lua
--[[
  put.lua: write entries of one shard into L2 (new version, hit count 0), then enforce the bounds.
  A plain put always writes; a fill (get_or_set after a miss) or a refresh writes only if nothing
  changed the entry since the caller looked, so a slow loader never overwrites a newer value.

  KEYS[1..7]  the shard's l2, l3, exp, stats, gone, fence and ghost keys (see includes/shard.lua)
  ARGV[1..9]  the common header (now ms, capacities, idle ttls ms, promote_after, L1 deltas, memory ms)
  ARGV[10..]  groups of eight, one group per entry:
                id           entry id
                payload      encoded value, bytes (non-empty)
                ttl_ms       absolute time to live, ms (0 = none)
                key          the original key when id is its hash, else empty
                since_ms     0 = a plain put; else a fill after a miss seen at this time (ms): refused
                             if the entry exists, or its `fence` record (delete, expiry, removal) is
                             at or after since_ms, or the shard was flushed at or after since_ms,
                             or since_ms is at or below `fence_floor`, or older than `memory`
                expect_ver   0 = any; else write only if the entry's current version is this one
                cost_ms      how long the value took to compute, ms (0 = unknown; for early refresh)
                prewarm      1 = written by prewarming before anyone asked (field w = 1 until the
                             first Redis hit, which counts it `prewarm_useful`), else 0

  A previous entry under the same id, in L2 or L3, is replaced. Absolute expiry is enforced by the
  scripts (never served at or after it; swept away by later calls on the shard), not by a Redis
  PEXPIRE: Redis deleting the data behind the scripts' back would lose its accounted size.
  Replacing an entry, or writing one that has a `gone` record, publishes an invalidation (and
  clears the record: those copies are being dropped).

  Reply: { {promotions, demotions, evictions, expirations, now_ms}, version_1, version_2, ... }
    version_i = the new entry's version, or 0 when a conditional write was refused
]]
-- @include "includes/shard.lua"

local GROUP = 8
local err = check_head()
if err then return redis.error_reply(err) end
local n_args = #ARGV - HEAD
if n_args < GROUP or n_args % GROUP ~= 0 then
  return redis.error_reply('VRC_BADARG put needs groups of (id, payload, ttl_ms, key, since_ms, expect_ver, cost_ms, '
      .. 'prewarm)')
end
for i = HEAD + 1, #ARGV, GROUP do
  if string.len(ARGV[i]) == 0 or string.len(ARGV[i + 1]) == 0 or not arg_int(i + 2, 0)
      or not arg_int(i + 4, 0) or not arg_int(i + 5, 0) or not arg_int(i + 6, 0)
      or (ARGV[i + 7] ~= '0' and ARGV[i + 7] ~= '1') then
    return redis.error_reply('VRC_BADARG put: empty id or payload, or ttl_ms, since_ms, expect_ver or cost_ms '
        .. 'not a non-negative integer, or prewarm not 0 or 1')
  end
end

sweep()

local marks = redis.call('HMGET', stats_key, 'flushed', 'fence_floor')
local flushed, floor = tonumber(marks[1]) or -1, tonumber(marks[2]) or -1
local versions, written, prewarmed = {}, 0, 0
for i = HEAD + 1, #ARGV, GROUP do
  local id, payload, ttl, key = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local since, expect, cost = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local ek = entry_key(id)
  local tier = nil
  if redis.call('ZSCORE', l2_key, id) then tier = 2 elseif redis.call('ZSCORE', l3_key, id) then tier = 3 end
  if tier and since > 0 then             -- past its expiry, or idle past its tiers' ttls, not swept yet:
    local expiry = tonumber((entry_fields(ek, 'x') or {})[1])   -- gone for a fill
    local touched = tonumber(redis.call('ZSCORE', tier == 2 and l2_key or l3_key, id))
    local ends = nil                                  -- when idleness removes it (ms), if it does
    if idle3 > 0 and (tier == 3 or idle2 > 0) then ends = touched + idle3 + (tier == 2 and idle2 or 0) end
    if expiry and now >= expiry then
      drop(id, tier, 'expired', expiry)
      tier = nil
    elseif ends and now >= ends then
      drop(id, tier, 'idle', ends)
      tier = nil
    end
  end
  local gone = redis.call('ZSCORE', gone_key, id)
  local refused = false
  if since > 0 then
    local fenced = tonumber(redis.call('ZSCORE', fence_key, id)) or -1
    refused = tier ~= nil or fenced >= since or flushed >= since or floor >= since or since < now - memory
  end
  if expect > 0 then
    refused = refused or tonumber((entry_fields(ek, 'ver') or {})[1]) ~= expect
  end
  if refused then
    versions[#versions + 1] = 0
  else
    if tier then                                       -- replaced: not a deletion, no `gone` record
      local size = tonumber((entry_fields(ek, 's') or {})[1]) or 0
      redis.call('ZREM', tier == 2 and l2_key or l3_key, id)
      if tier == 2 then bytes2 = bytes2 - size else bytes3 = bytes3 - size end
    end
    redis.call('ZREM', exp_key, id)
    redis.call('DEL', ek)
    local version = next_version()
    redis.call('HSET', ek, 'v', payload, 's', string.len(payload), 'n', 0, 'ver', version, 'f', 1)
    if key ~= '' then redis.call('HSET', ek, 'k', key) end
    if cost > 0 then redis.call('HSET', ek, 'd', cost) end
    if ARGV[i + 7] == '1' then
      redis.call('HSET', ek, 'w', 1)
      prewarmed = prewarmed + 1
    end
    if ttl > 0 then
      redis.call('HSET', ek, 'x', now + ttl)
      redis.call('ZADD', exp_key, now + ttl, id)
    end
    redis.call('ZADD', l2_key, stamp(l2_key), id)
    redis.call('ZREM', ghost_key, id)                  -- back in Redis: no longer sizing evidence
    bytes2 = bytes2 + string.len(payload)
    if tier or gone then                               -- some process may hold an older copy
      announce(id, version)
      if gone then redis.call('ZREM', gone_key, id) end
    end
    versions[#versions + 1] = version
    written = written + 1
  end
end

enforce_bounds()
table.insert(versions, 1, finish({puts = written, prewarmed = prewarmed}))
return versions
