#!lua
--[[
  put.lua: write entries of one shard into L2 (a new version, hit count 0), publish that they changed,
  then enforce the bounds. A plain put always writes; a fill (get_or_set after a miss, prewarming) or a
  refresh writes only if nothing changed the entry since the caller looked, so a slow loader never
  overwrites a newer value.

  KEYS[1]     the shard's l2 key; the shard's other keys derive from it (see includes/shard.lua)
  ARGV[1..7]  the common header (now ms, capacities, idle ttls ms, promote_after, memory ms)
  ARGV[8..]   groups of ten, one group per entry:
                id           entry id
                payload      encoded value, bytes (non-empty)
                ttl_ms       absolute time to live, ms (0 = none)
                key          the original key when id is its hash, else empty
                since_ms     0 = a plain put; else a fill after a miss seen at this time (ms): refused
                             if the entry exists, or its `fence` record is at or after since_ms, or
                             the shard was flushed at or after since_ms, or since_ms is at or below
                             `fence_floor`, or older than `memory`
                expect_ver   0 = any; else write only if the entry's current version is this one
                cost_ms      how long the value took to compute, ms (0 = unknown; for early refresh)
                prewarm      1 = written by prewarming before anyone asked (field w = 1 until the
                             first Redis hit, which counts it `prewarm_useful`), else 0
                grace_ms     fail-safe grace, ms (0 = none): with a ttl, the entry is served until
                             now + ttl_ms and kept until grace_ms later (see includes/shard.lua)
                tags         the entry's tags, each "<length>:<name>" (empty = none; at most 64 tags
                             of 1 to 256 bytes); a tag's set written by hand with another type is
                             refused before anything is written

  A previous entry under the same id, in L2 or L3, is replaced, and so are its tags. Every entry written is announced on
  <ns>:{<tag>}:inval with its new version (always: no process may keep serving an older copy, whether or not
  Redis remembers that one exists), and with its payload when it has no ttl and is small (see announce()).
  The entry's Redis expiry is its deadline (includes/shard.lua).

  Reply: { {promotions, demotions, evictions, expirations, now_ms}, version_1, version_2, ... }
    version_i = the new entry's version, or 0 when a conditional write was refused
]]
-- @include "includes/shard.lua"

local GROUP = 10
local err = check_head()
if err then return redis.error_reply(err) end
local n_args = #ARGV - HEAD
if n_args < GROUP or n_args % GROUP ~= 0 then
  return redis.error_reply('VRC_BADARG put needs groups of (id, payload, ttl_ms, key, since_ms, expect_ver, cost_ms, '
      .. 'prewarm, grace_ms, tags)')
end
local tag_names = {}                     -- per group: its tags' names
for i = HEAD + 1, #ARGV, GROUP do
  if string.len(ARGV[i]) == 0 or string.len(ARGV[i + 1]) == 0 or not arg_int(i + 2, 0)
      or not arg_int(i + 4, 0) or not arg_int(i + 5, 0) or not arg_int(i + 6, 0)
      or (ARGV[i + 7] ~= '0' and ARGV[i + 7] ~= '1') or not arg_int(i + 8, 0) then
    return redis.error_reply('VRC_BADARG put: empty id or payload, or ttl_ms, since_ms, expect_ver, cost_ms or '
        .. 'grace_ms not a non-negative integer, or prewarm not 0 or 1')
  end
  local names = parse_tags(ARGV[i + 9])
  if not names then
    return redis.error_reply('VRC_BADARG put: tags must be "<length>:<name>" each, at most ' .. MAX_TAGS
        .. ' of 1 to ' .. MAX_TAG_BYTES .. ' bytes')
  end
  local wrong = check_tag_types(names)
  if wrong then return redis.error_reply(wrong) end
  tag_names[#tag_names + 1] = names
end

sweep()

local marks = redis.call('HMGET', stats_key, 'flushed', 'fence_floor')
local flushed, floor = tonumber(marks[1]) or -1, tonumber(marks[2]) or -1
local versions, written, prewarmed, ghost_hits = {}, 0, 0, 0
for i = HEAD + 1, #ARGV, GROUP do
  local id, payload, ttl, key = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local since, expect, cost = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local grace, names = tonumber(ARGV[i + 8]), tag_names[(i - HEAD - 1) / GROUP + 1]
  local ek = entry_key(id)
  local tier, touched = tier_of(id)
  local current = entry_fields(ek, 'ver', 'x')
  if tier and not (current and current[1]) then       -- its data is gone (Redis expired or evicted it)
    drop(id, tier, 'vanished', tonumber(redis.call('ZSCORE', exp_key, id)))
    tier = nil
  elseif tier and since > 0 then                      -- past its deadline, not swept yet: gone for a fill
    local expiry = tonumber(current[2])
    local ends = deadline(tier, touched, nil)
    if expiry and now >= expiry then
      drop(id, tier, 'expired', expiry)
      tier = nil
    elseif ends and now >= ends then
      drop(id, tier, 'idle', ends)
      tier = nil
    end
  end
  if not tier and redis.call('HEXISTS', size_key, id) == 1 then
    drifted = true  -- Redis evicted its index member: its bytes are still counted somewhere; recount
  end
  local refused = false
  if since > 0 then
    local fenced = tonumber(redis.call('ZSCORE', fence_key, id)) or -1
    refused = tier ~= nil or fenced >= since or flushed >= since or floor >= since or since < now - memory
  end
  if expect > 0 then
    refused = refused or not tier or tonumber(current and current[1]) ~= expect
  end
  if refused then
    versions[#versions + 1] = 0
  else
    if tier then                                       -- replaced: the old one's bytes go
      local size = take_size(id)
      redis.call('ZREM', tier == 2 and l2_key or l3_key, id)
      if tier == 2 then bytes2 = bytes2 - size else bytes3 = bytes3 - size end
    end
    redis.call('DEL', ek)
    untag(id)                                          -- the old entry's tags (or a record left behind)
    local version = next_version()
    local expiry = nil
    redis.call('HSET', ek, 'v', payload, 'ver', version, 't', 2, 'n', 0)
    if key ~= '' then redis.call('HSET', ek, 'k', key) end
    if cost > 0 then redis.call('HSET', ek, 'd', cost) end
    if ARGV[i + 7] == '1' then
      redis.call('HSET', ek, 'w', 1)
      prewarmed = prewarmed + 1
    end
    if ttl > 0 then
      redis.call('HSET', ek, 'x', string.format('%d', now + ttl))   -- served until then
      expiry = now + ttl + grace                                     -- kept until then
      if grace > 0 then redis.call('HSET', ek, 'z', string.format('%d', expiry)) end
      redis.call('ZADD', exp_key, expiry, id)
    else
      redis.call('ZREM', exp_key, id)
    end
    local score = stamp(l2_key)
    redis.call('ZADD', l2_key, score, id)
    set_deadline(ek, deadline(2, score, expiry), 2, score, true)
    redis.call('HSET', size_key, id, string.len(payload))
    if #names > 0 then tag(id, ARGV[i + 9], names) end
    -- Back in Redis: no longer sizing evidence. A write of an entry L3 evicted lately is what follows
    -- a miss on it (cache-aside), and may reach Redis before that miss's bookkeeping does: it counts
    -- the ghost hit then (the miss's report finds no record left, and counts nothing).
    if redis.call('ZREM', ghost_key, id) == 1 then ghost_hits = ghost_hits + 1 end
    bytes2 = bytes2 + string.len(payload)
    announce(id, version, ttl == 0 and payload or nil)
    versions[#versions + 1] = version
    written = written + 1
  end
end

enforce_bounds()
table.insert(versions, 1, finish({puts = written, prewarmed = prewarmed, ghost_hits = ghost_hits}))
return versions
