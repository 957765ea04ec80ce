--[[
  includes/shard.lua: the shard prelude, pasted at the top of put.lua, delete.lua and flush.lua, and
  inside get.lua's full path (flush.lua takes its own ARGV, not the common header; it uses the key
  names and type check). It pastes includes/head.lua (key names, header, stamps) and includes/acl.lua.

  A namespace is split into shards; every key of one shard shares the shard's hash tag, so each
  script call touches exactly one hash slot (Redis Cluster rule). The shard's keys:

    KEYS[1]  <ns>:{<tag>}:l2      ZSET  member = entry id, score = last touch in L2 (ms, see stamp() in includes/head.lua)
    KEYS[2]  <ns>:{<tag>}:l3      ZSET  member = entry id, score = last touch in L3 (ms, see stamp() in includes/head.lua)
    KEYS[3]  <ns>:{<tag>}:exp     ZSET  member = entry id, score = absolute expiry (ms); entries with a ttl only
    KEYS[4]  <ns>:{<tag>}:stats   HASH  fleet counters and byte totals of this shard
    KEYS[5]  <ns>:{<tag>}:gone    ZSET  member = entry id, score = when it left Redis while some
                                        process may still hold an L1 copy (ms): rewriting it publishes
    KEYS[6]  <ns>:{<tag>}:fence   ZSET  member = entry id, score = when it was deleted, expired or
                                        removed (ms): a fill that started before that is refused
  Both are kept for `memory` ms and at most max(l2 + l3 capacity, RECORDS_MAX) records each; the
  oldest `gone` records dropped past that are announced, and a dropped `fence` record raises the
  stats field `fence_floor`, below which every fill is refused.
    KEYS[7]  <ns>:{<tag>}:ghost   ZSET  member = entry id, score = when L3 overflow evicted it (ms): the
                                        last `step` (10% of the shard's L3) evictions. Sizing evidence
                                        (adaptive.py): a miss on one is a hit a bigger L3 would have
                                        had (`ghost_hits`); a hit on one of the `step` least recently
                                        used L3 entries one a smaller L3 would have lost (`tail_hits`).

  Entry data lives at <ns>:{<tag>}:e:<id>, a HASH:
    v = payload (bytes), s = payload size accounted in the byte totals (bytes),
    n = Redis hits since it last entered L2/L3 by put or demotion,
    ver = version (from the shard's `seq` counter), x = absolute expiry (ms, absent = none),
    k = the original key when <id> is a hash of it, f = 1 once some process may hold an L1 copy,
    d = how long the value took to compute (ms, from get_or_set; for early refresh),
    w = 1 while a prewarmed entry has not been hit yet.
  Entry key names are derived from KEYS[1] here, so they always share its hash tag and slot.

  Invalidation: a script that really changes a value (replaces or deletes an entry, or writes one
  that some L1 may still hold from before it left Redis) publishes on channel <ns>:inval one line
  per changed entry, "<length of id>:<id> <version>\n" (readable with redis-cli SUBSCRIBE, safe for
  binary ids); every process drops L1 copies of those ids older than the version. First writes, promotion, demotion and LRU movement publish nothing. Absolute
  expiry needs no message: every L1 copy carries the value's deadline.

  Common ARGV (every script using this prelude):
    ARGV[1]  now, ms since the epoch; 0 = use the server's TIME (tests pass a fake clock)
    ARGV[2]  L2 capacity of this shard, entries (>= 1)
    ARGV[3]  L3 capacity of this shard, entries (>= 1)
    ARGV[4]  L2 idle ttl, ms: an entry untouched this long moves to L3 (0 = never)
    ARGV[5]  L3 idle ttl, ms: an entry untouched this long is removed (0 = never)
    ARGV[6]  promote_after, Redis hits (>= 1)
    ARGV[7]  L1 hits the calling process had since its last report (>= 0; fleet counter piggyback)
    ARGV[8]  L1 evictions since its last report (>= 0)
    ARGV[9]  memory: how long `gone` and `fence` records are kept, ms (>= 1; the longest L1 life or
             fill they guard); the shard keeps the largest value any worker sent (stats field
             `memory`), so a worker with a short l1_ttl cannot drop records a longer one needs
  Script-specific ARGV start at ARGV[10] (HEAD + 1).

  Tier semantics kept here:
    * an entry is in exactly one of L2 / L3; data and index entries come and go together;
    * L2 over capacity -> its least recently touched entries move to L3 (count reset);
      L3 over capacity -> its least recently touched entries are removed (evictions);
    * idle movement and absolute expiry are applied to the key being read, and swept for up to
      SWEEP other due entries per call (put and delete always; get on its full path: see get.lua),
      so Redis never does unbounded work in one call.
]]
-- @include "includes/head.lua"
-- @include "includes/acl.lua"

local SWEEP = 16
local RECORDS_MAX = 1024  -- `gone`/`fence` records kept per shard at least (more for bigger shards)

local channel = string.sub(l2_key, 1, string.find(l2_key, ':{', 1, true) - 1) .. ':inval'

-- ARGV[i] as an integer >= min, or nil. Only plain decimal digits are accepted (no sign, exponent,
-- hex, spaces, inf or nan, all of which tonumber takes), and at most 2^53, so the number is exact
-- in Lua and Redis reads it back unchanged when the script writes it.
local function arg_int(i, min)
  local s = ARGV[i]
  if s == nil or string.len(s) > 16 or not string.match(s, '^%d+$') then return nil end
  local v = tonumber(s)
  if v < min or v > 9007199254740992 then return nil end
  return v
end

-- The shard's own keys must have their types: a key overwritten by hand with another type would
-- make the script fail midway, after some of its writes. (Entry keys are checked as they are read.)
-- Returns an error message or nil. Called before the first write.
-- Every command the shard scripts run (see includes/acl.lua); PUBLISH is checked with the channel.
local SHARD_COMMANDS = {'type', 'time', 'hget', 'hmget', 'hset', 'hsetnx', 'hincrby', 'hdel', 'del', 'zadd', 'zcount',
                        'zmscore', 'exists', 'set', 'pttl',
                        'zrem', 'zscore', 'zcard', 'zrange', 'zrangebyscore', 'zremrangebyscore',
                        'zremrangebyrank'}

local function check_shard_types()
  for i, expected in ipairs({'zset', 'zset', 'zset', 'hash', 'zset', 'zset', 'zset'}) do
    local actual = redis.call('TYPE', KEYS[i]).ok
    if actual ~= expected and actual ~= 'none' then
      return 'VRC_WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. actual .. ', not a ' .. expected
          .. ': it was written outside the cache; delete that key (its shard loses only its index)'
    end
  end
  return nil
end

-- Every check a call needs before its first write when it may run any command on any shard key:
-- the types of the shard's keys and the ACL permissions. Returns an error message or nil.
local function check_all()
  return check_shard_types() or check_commands(SHARD_COMMANDS, KEYS[1], channel)
end

-- Validates the common ARGV and checks everything (parse_head, then check_all); returns an error
-- message or nil. Called before the first write by the scripts without a read-only fast path.
local function check_head()
  return parse_head() or check_all()
end

local ev = {promotions = 0, demotions = 0, evictions = 0, expirations = 0}
local bytes2, bytes3 = 0, 0          -- byte deltas, written once at the end
local changed = {}                   -- invalidation lines to publish at the end
local noted = false                  -- a `gone` or `fence` record was added in this call
local ghosted = false                -- an L3 eviction was remembered in `ghost` in this call

-- The same, but a key of another type is deleted: the entry is then simply gone. (A write: only
-- after the call's checks.)
local function entry_fields(ek, ...)
  local fields = read_fields(ek, ...)
  if fields == nil then redis.call('DEL', ek) end
  return fields
end

-- The next version of this shard. A new shard's counter starts at now (ms) * 1000, so versions keep
-- growing across a flushed or restarted Redis (L1 refuses a copy older than one it has seen).
local function next_version()
  redis.call('HSETNX', stats_key, 'seq', string.format('%d', now * 1000))
  return redis.call('HINCRBY', stats_key, 'seq', 1)
end

-- Records that `id` was removed now: fills that started at or before `fence_at` (default now) are
-- refused (`fence`), and if a process may hold an L1 copy (`cached`), rewriting it will publish (`gone`).
local function note_removal(id, cached, fence_at)
  redis.call('ZADD', fence_key, fence_at or now, id)
  if cached then redis.call('ZADD', gone_key, now, id) end
  noted = true
end

-- Queues "<length of id>:<id> <version>\n" for the invalidation published by finish().
local function announce(id, version)
  changed[#changed + 1] = string.len(id) .. ':' .. id .. ' ' .. string.format('%d', version) .. '\n'
end

-- Removes an entry from every index and deletes its data. `tier` is 2, 3 or nil (not indexed);
-- `why` is 'deleted', 'evicted', 'idle', 'expired' or 'corrupt'. Every removal gets a `fence` record; one
-- leaving while some L1 may hold a copy (f = 1) a `gone` record too, unless it expired (expired
-- copies end by themselves in every L1) or was deleted (the delete itself publishes).
-- A delete fences fills that started up to now. Any other removal is not a write: it fences those
-- that started before the value stopped being served (`ended`, ms: its expiry or idle deadline;
-- default now), so a fill whose miss saw the value gone is accepted, even in the same millisecond.
local function drop(id, tier, why, ended)
  local ek = entry_key(id)
  local f = entry_fields(ek, 's', 'f') or {}
  local size = tonumber(f[1]) or 0
  if tier == 2 then redis.call('ZREM', l2_key, id); bytes2 = bytes2 - size
  elseif tier == 3 then redis.call('ZREM', l3_key, id); bytes3 = bytes3 - size end
  redis.call('ZREM', exp_key, id)
  redis.call('DEL', ek)
  local fence_at = now
  if why ~= 'deleted' then fence_at = math.min(ended or now, now) - 1 end
  note_removal(id, f[2] and why ~= 'expired' and why ~= 'deleted', fence_at)
  if why == 'evicted' then
    redis.call('ZADD', ghost_key, now, id)
    ghosted = true
  end
  if why == 'evicted' then ev.evictions = ev.evictions + 1
  elseif why == 'idle' or why == 'expired' then ev.expirations = ev.expirations + 1 end
end

-- Moves an entry out of L2's index into L3 with the given score (nil = a new stamp); count restarts.
local function into_l3(id, score)
  local ek = entry_key(id)
  redis.call('ZREM', l2_key, id)
  local size = tonumber((entry_fields(ek, 's') or {})[1])
  if size == nil then                -- leftover index entry whose data is gone: finish removing it
    redis.call('ZREM', exp_key, id)
    return
  end
  redis.call('ZADD', l3_key, score or stamp(l3_key), id)
  redis.call('HSET', ek, 'n', 0)
  bytes2, bytes3 = bytes2 - size, bytes3 + size
  ev.demotions = ev.demotions + 1
end

-- Bounded sweep of due work: absolute expiry, L2 idle -> L3, L3 idle -> gone, old records.
local function sweep()
  local due = redis.call('ZRANGEBYSCORE', exp_key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, SWEEP)
  for i = 1, #due, 2 do
    local id, tier = due[i], nil
    if redis.call('ZSCORE', l2_key, id) then tier = 2 elseif redis.call('ZSCORE', l3_key, id) then tier = 3 end
    drop(id, tier, 'expired', tonumber(due[i + 1]))
  end
  if idle2 > 0 then
    due = redis.call('ZRANGEBYSCORE', l2_key, '-inf', now - idle2, 'WITHSCORES', 'LIMIT', 0, SWEEP)
    for i = 1, #due, 2 do into_l3(due[i], tonumber(due[i + 1]) + idle2) end  -- idle since last touch + idle2
  end
  if idle3 > 0 then
    due = redis.call('ZRANGEBYSCORE', l3_key, '-inf', now - idle3, 'WITHSCORES', 'LIMIT', 0, SWEEP)
    for i = 1, #due, 2 do drop(due[i], 3, 'idle', tonumber(due[i + 1]) + idle3) end
  end
  local longest = tonumber(redis.call('HGET', stats_key, 'memory')) or 0
  if memory > longest then redis.call('HSET', stats_key, 'memory', memory) else memory = longest end
  redis.call('ZREMRANGEBYSCORE', gone_key, '-inf', now - memory)
  redis.call('ZREMRANGEBYSCORE', fence_key, '-inf', now - memory)
end

-- LRU bounds: L2 overflow demotes to L3, L3 overflow evicts.
local function enforce_bounds()
  local over = redis.call('ZCARD', l2_key) - cap2
  if over > 0 then
    for _, id in ipairs(redis.call('ZRANGE', l2_key, 0, over - 1)) do into_l3(id, nil) end
  end
  over = redis.call('ZCARD', l3_key) - cap3
  if over > 0 then
    for _, id in ipairs(redis.call('ZRANGE', l3_key, 0, over - 1)) do drop(id, 3, 'evicted') end
  end
end

-- Writes this call's counters and byte deltas into the shard's stats hash, bounds the records
-- and publishes the invalidations (one place, at the end). Returns the events reply, with `now`.
local function finish(extra)
  local deltas = {l1_hits = l1_hits, l1_evictions = l1_evictions, l2_bytes = bytes2, l3_bytes = bytes3,
                  promotions = ev.promotions, demotions = ev.demotions, evictions = ev.evictions,
                  expirations = ev.expirations}
  for field, d in pairs(extra) do deltas[field] = d end
  for field, d in pairs(deltas) do
    if d ~= 0 then count(field, d) end  -- the stats' type was checked before the first write
  end
  if ghosted then redis.call('ZREMRANGEBYRANK', ghost_key, 0, -(sizing_step() + 1)) end
  if noted then
    -- Past the bound the oldest records are dropped, but not forgotten: dropped `gone` ids are
    -- announced now (no process keeps a copy a later write could not reach), and the newest
    -- dropped `fence` time becomes a floor below which fills are refused.
    local bound = math.max(cap2 + cap3, RECORDS_MAX)
    local over = redis.call('ZCARD', gone_key) - bound
    if over > 0 then
      local version = next_version()
      for _, id in ipairs(redis.call('ZRANGE', gone_key, 0, over - 1)) do announce(id, version) end
      redis.call('ZREMRANGEBYRANK', gone_key, 0, over - 1)
    end
    over = redis.call('ZCARD', fence_key) - bound
    if over > 0 then
      local last = redis.call('ZRANGE', fence_key, over - 1, over - 1, 'WITHSCORES')
      redis.call('HSET', stats_key, 'fence_floor', last[2])
      redis.call('ZREMRANGEBYRANK', fence_key, 0, over - 1)
    end
  end
  if #changed > 0 then redis.call('PUBLISH', channel, table.concat(changed)) end
  return {ev.promotions, ev.demotions, ev.evictions, ev.expirations, now}
end
