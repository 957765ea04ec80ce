--[[
  includes/shard.lua: the prelude of every script of a shard (put, delete, touch, lease, flush): the
  key names, the common header, the checks made before a first write, and the tier bookkeeping
  (versions, moves between tiers, removals, sweeps, LRU bounds, invalidations).

  A namespace is split into shards; every key of one shard shares the shard's hash tag, so a call
  touches one hash slot (the Redis Cluster rule). A call names one key, KEYS[1], the shard's L2
  index; the others are derived from it here:

    <ns>:{<tag>}:l2      ZSET  entry id -> last touch (ms; see stamp())
    <ns>:{<tag>}:l3      ZSET  entry id -> last touch (ms)
    <ns>:{<tag>}:exp     ZSET  entry id -> absolute expiry (ms; z if set); entries with a ttl only
    <ns>:{<tag>}:size    HASH  entry id -> payload bytes, for every indexed entry: the byte totals
                               stay exact when Redis drops an entry's data itself
    <ns>:{<tag>}:stats   HASH  the shard's fleet counters, byte totals (l2_bytes, l3_bytes), the
                               version counter `seq`, `flushed`, `fence_floor`, `memory`
    <ns>:{<tag>}:fence   ZSET  entry id -> when it was removed (ms): a fill that started before is
                               refused; kept `memory` ms, at most max(capacity, RECORDS_MAX) records
                               (a dropped record raises `fence_floor`, below which fills are refused)
    <ns>:{<tag>}:ghost   ZSET  entry id -> when L3 overflow evicted it (ms): sizing evidence, the
                               last `step` (10% of the shard's L3) evictions
    <ns>:{<tag>}:e:<id>  HASH  one entry: v payload, ver version, t tier (2 or 3), n fleet Redis
                               hits since it entered its tier (counted up to promote_after), x
                               absolute expiry (ms, absent: none), k the original key (when <id> is
                               its hash), d how long the value took to compute (ms), w = 1 while
                               prewarmed and not read yet, e the idle step its expiry was set in,
                               z when it is removed if later than x (fail-safe, below).
                               Its Redis expiry is the entry's removal deadline: its absolute expiry
                               (z if set), or the end of its idle time, whichever comes first (see
                               deadline()).
    <ns>:{<tag>}:lease:<id>  STRING  the token of the process computing a missing value
    <ns>:{<tag>}:tags    HASH  entry id -> its tags, each "<length>:<name>" (tagged entries only)
    <ns>:{<tag>}:tag:<name>  SET  the ids of the shard's entries tagged <name>

  Tags are kept with their entries: whatever removes or rewrites an entry removes its tag records
  (untag()), so a tag's sets hold only entries the indexes hold. A shard that never held a tagged
  entry pays one EXISTS per call that removes or rewrites entries.

  Fail-safe: an entry written with a grace period (put.lua's grace_ms) is served until `x`, its
  absolute expiry, and kept until `z` = x + grace (its `exp` record and its Redis expiry are `z`), so
  a get_or_set whose loader fails can fall back on it; nothing serves it past `x` otherwise.

  A read of a hit is a plain HMGET of the entry (no script): Redis's own key expiry makes a value
  past its deadline unreadable at once, and the reader's process reports the hit later, in a batch
  (touch.lua), which is when LRU stamps, hit counts and promotions happen. So an index member may
  point at data Redis has already dropped (expired, or evicted under an evicting maxmemory policy):
  every script treats that as a removal the moment it meets it, and sweeps find the rest.

  Invalidation: every write that changes or removes a value (put.lua, delete.lua, flush.lua)
  publishes on the shard's channel <ns>:{<tag>}:inval with SPUBLISH (sharded pub/sub), always,
  whether or not Redis remembers that some process holds a copy: one line per entry,
  "<length of id>:<id> <version>\n" (a put of a value without a ttl of at most UPDATE_BYTES adds the
  value: "<length of id>:<id> <version> <length>:<payload>\n", see announce()), or "*<shard> <version>"
  for a flushed shard. The channel has the shard's hash tag, so on a Redis Cluster it lives in the
  shard's slot: only the shard's master (and its replicas) carry the message, not every node of the
  cluster as PUBLISH would. Every process drops its L1 copies older than the version (replaces them,
  when the line carries the value). Moves between tiers, expiry and
  evictions publish nothing: they do not change a value, and every L1 copy carries its own deadline.

  Common ARGV (HEAD of them, every script but flush.lua):
    ARGV[1]  now, ms since the epoch; 0 = the server's TIME (tests pass a fake clock)
    ARGV[2]  L2 capacity of this shard, entries (>= 1)
    ARGV[3]  L3 capacity of this shard, entries (>= 1)
    ARGV[4]  L2 idle ttl, ms: an entry untouched this long moves to L3 (0 = never)
    ARGV[5]  L3 idle ttl, ms: an entry untouched this long is removed (0 = never)
    ARGV[6]  promote_after, fleet Redis hits (>= 1)
    ARGV[7]  memory: how long `fence` records are kept, ms (>= 1; the longest fill they guard); the
             shard keeps the largest value any worker sent (stats field `memory`)
  Script-specific ARGV start at ARGV[HEAD + 1].
]]
-- @include "includes/acl.lua"

local HEAD = 7
local SWEEP = 32             -- due entries a sweep handles per kind and call: bounded work per call
local RECORDS_MAX = 1024     -- `fence` records kept per shard at least (more for bigger shards)
local MAX_INT = 9007199254740992

local l2_key = KEYS[1]
local base = string.sub(l2_key or '', 1, -3)          -- '<ns>:{<tag>}:'
local l3_key, exp_key, size_key = base .. 'l3', base .. 'exp', base .. 'size'
local stats_key, fence_key, ghost_key = base .. 'stats', base .. 'fence', base .. 'ghost'
local tags_key = base .. 'tags'
local channel = base .. 'inval'        -- the shard's invalidation channel (sharded pub/sub, same slot)

-- The common ARGV as numbers, and `now` from the server's TIME when ARGV[1] is 0. Only plain decimal
-- digits are accepted (no sign, exponent, hex, spaces, inf or nan, all of which tonumber takes), at
-- most 2^53, so each number is exact in Lua and Redis reads it back unchanged when the script writes
-- it. Returns an error message or nil; reads nothing but TIME and writes nothing.
local HEAD_PATTERN = '^%d+ %d+ %d+ %d+ %d+ %d+ %d+$'  -- HEAD of them
local BAD_HEAD = 'VRC_BADARG common ARGV must be non-negative integers (now, caps >= 1, ttls, promote_after >= 1, '
    .. 'memory >= 1) and KEYS[1] a shard\'s l2 key'
local now, cap2, cap3, idle2, idle3, promote_after, memory
local real_time = false      -- now is the server's own clock (then deadlines are Redis expiry times)
local function parse_head()
  if #KEYS ~= 1 or string.sub(l2_key, -4) ~= '}:l2' or not string.find(l2_key, ':{', 1, true) then return BAD_HEAD end
  if #ARGV < HEAD or not string.find(table.concat(ARGV, ' ', 1, HEAD), HEAD_PATTERN) then return BAD_HEAD end
  now, cap2, cap3 = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
  idle2, idle3, promote_after, memory = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  if cap2 < 1 or cap3 < 1 or promote_after < 1 or memory < 1
      or math.max(now, cap2, cap3, idle2, idle3, promote_after, memory) > MAX_INT then
    return BAD_HEAD
  end
  if now == 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    real_time = true
  end
  return nil
end

-- ARGV[i] as an integer >= min, or nil (plain decimal digits only, at most 2^53; see parse_head).
local function arg_int(i, min)
  local s = ARGV[i]
  if s == nil or string.len(s) > 16 or not string.match(s, '^%d+$') then return nil end
  local v = tonumber(s)
  if v < min or v > MAX_INT then return nil end
  return v
end

-- Every command the shard scripts run (see includes/acl.lua); SPUBLISH is checked with the channel.
local SHARD_COMMANDS = {'type', 'time', 'exists', 'hget', 'hmget', 'hset', 'hsetnx', 'hincrby', 'hdel', 'del',
                        'zadd', 'zrem', 'zscore', 'zmscore', 'zcard', 'zcount', 'zrange', 'zrangebyscore',
                        'zremrangebyscore', 'zremrangebyrank', 'pexpire', 'pexpireat', 'persist', 'set', 'pttl',
                        'hstrlen', 'hlen', 'hkeys', 'hexists', 'sadd', 'srem', 'scard', 'srandmember'}
local SHARD_TYPES = {{l2_key, 'zset'}, {l3_key, 'zset'}, {exp_key, 'zset'}, {size_key, 'hash'},
                     {stats_key, 'hash'}, {fence_key, 'zset'}, {ghost_key, 'zset'}, {tags_key, 'hash'}}

-- The shard's own keys must have their types: a key overwritten by hand with another type would make
-- the script fail midway, after some of its writes. (Entry keys are checked as they are read.)
local function check_shard_types()
  for _, kt in ipairs(SHARD_TYPES) do
    local actual = redis.call('TYPE', kt[1]).ok
    if actual ~= kt[2] and actual ~= 'none' then
      return 'VRC_WRONGTYPE ' .. kt[1] .. ' holds a ' .. actual .. ', not a ' .. kt[2]
          .. ': it was written outside the cache; delete that key (its shard loses only its index)'
    end
  end
  return nil
end

local drifted = false                -- the byte totals need a recount at the end of the call (recount())
local check_totals = true            -- finish() checks the byte totals (touch.lua: once per sweep window)

-- check_head: validates the common ARGV, the shard keys' types and the ACL permissions; an error message
-- or nil. Called by every script before its first write. check_shard, its second half (lease.lua calls it
-- apart, once it knows it will write more than its lease; `types_checked`: it checked them first): the
-- types and permissions,
-- and a note, made before anything changes them, of whether the byte totals were lost (Redis evicted the
-- stats hash while the tiers hold entries). `skip_checks` (touch.lua, told so by its caller): the ARGV
-- only; see touch.lua's header for why that is safe there.
local function check_shard(types_checked)
  local err = (not types_checked and check_shard_types()) or check_commands(SHARD_COMMANDS, l2_key, channel)
  if err then return err end
  local totals = redis.call('HMGET', stats_key, 'l2_bytes', 'l3_bytes')
  if (not totals[1] and redis.call('ZCARD', l2_key) > 0) or (not totals[2] and redis.call('ZCARD', l3_key) > 0) then
    drifted = true
  end
  return nil
end
local function check_head(skip_checks)
  local err = parse_head()
  if err or skip_checks then return err end
  return check_shard()
end

local function entry_key(id) return base .. 'e:' .. id end

-- Fields of an entry's data hash (HMGET), or nil when the key holds another type (written by hand).
local function read_fields(ek, ...)
  local fields = redis.pcall('HMGET', ek, ...)
  if type(fields) == 'table' and fields.err then return nil end
  return fields
end

-- The same, but a key of another type is deleted: the entry is then simply gone. (A write.)
local function entry_fields(ek, ...)
  local fields = read_fields(ek, ...)
  if fields == nil then redis.call('DEL', ek) end
  return fields
end

-- Adds d to a counter of the stats hash. A counter written by hand that is no integer is reset to d
-- (HINCRBY would fail the call midway). The stats key's type was checked before the first write.
local function count(field, d)
  local done = redis.pcall('HINCRBY', stats_key, field, d)
  if type(done) == 'table' and done.err then redis.call('HSET', stats_key, field, d) end
end

-- Touch scores: now in ms, made strictly increasing within each tier (above its newest score, by
-- 0.001 ms if they share a millisecond), so LRU order within a shard is exact.
local newest = {}
local function newest_touch(key)
  local t = newest[key]
  if t == nil then
    t = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]) or 0
    newest[key] = t
  end
  return t
end
local function stamp(key)
  local t = math.max(now, newest_touch(key) + 0.001)
  newest[key] = t
  return t
end

-- Sizing evidence (adaptive.py): how many L3 evictions are remembered as ghosts, which is also the
-- number of least recently used L3 entries whose hits count as tail hits.
local function sizing_step() return math.max(1, math.floor(cap3 / 10 + 0.5)) end

-- When an entry of `tier`, last touched at `touched` (ms), stops being served: its absolute expiry
-- or the end of its idle time (in L2 the idle times of both tiers: it moves to L3 on the way),
-- whichever comes first; nil for never.
local function deadline(tier, touched, expiry)
  local idle = nil
  if tier == 2 then
    if idle2 > 0 and idle3 > 0 then idle = touched + idle2 + idle3 end
  elseif idle3 > 0 then
    idle = touched + idle3
  end
  if expiry and (idle == nil or expiry < idle) then return expiry end
  return idle
end

-- How far an entry's idle deadline may lag its last touch (ms): readers ask for an entry's Redis
-- expiry to be moved (touch.lua's 'e') only when its touch entered a new step of this length, 1/64 of
-- the tier's idle time, so a hot entry costs a write of its expiry now and then, not on every batch.
-- The expiry is then at most two steps earlier than the exact idle deadline (about 47 minutes of a
-- day's l3_ttl), never later. nil: the tier has no idle deadline. (tiers.py computes the same steps.)
local function idle_step(tier)
  local idle = 0
  if tier == 2 then
    if idle2 > 0 and idle3 > 0 then idle = idle2 + idle3 end
  else
    idle = idle3
  end
  if idle == 0 then return nil end
  return math.max(1, math.floor(idle / 64))
end

-- Makes the entry's Redis expiry its deadline `at` (ms on the scripts' clock; nil: none), computed from
-- a touch at `touched` (ms) in `tier`, and records that touch's idle step in field `e` (readers compare
-- it with the current step). With the server's own clock that is the exact time; with a test clock the
-- same distance from now. Returns whether the entry's data exists (`present`: the caller knows it
-- does); nothing is written if not. A deadline already passed deletes the data and returns false (the
-- caller drops the entry). The expiry is set last: Redis 7.0 expires keys in real time during a script,
-- so a write after an expiry less than a millisecond away could land on a key just expired and create it
-- anew, without its data or an expiry.
local function set_deadline(ek, at, tier, touched, present)
  if at ~= nil and at <= now then
    redis.call('DEL', ek)
    return false
  end
  if not present and redis.call('EXISTS', ek) == 0 then return false end
  local step = idle_step(tier)
  if step then redis.call('HSET', ek, 'e', math.floor(touched / step)) end
  if at == nil then
    redis.call('PERSIST', ek)
  elseif real_time then                 -- whole ms below 2^53: Lua hands such a number over as digits
    redis.call('PEXPIREAT', ek, math.floor(at))
  else
    redis.call('PEXPIRE', ek, math.max(1, math.floor(at - now)))
  end
  return true
end

local ev = {promotions = 0, demotions = 0, evictions = 0, expirations = 0}
local bytes2, bytes3 = 0, 0          -- byte deltas, written once at the end
local changed = {}                   -- invalidation lines to publish at the end
local noted = false                  -- a `fence` record was added in this call
local ghosted = false                -- an L3 eviction was remembered in `ghost` in this call

-- The next version of this shard: one more than the last, and never below now (ms) * 1000, so versions
-- keep growing across a flushed or restarted Redis, or a `stats` hash Redis evicted (L1 refuses a copy
-- older than one it has seen, and drops copies older than an announced version). A counter written by
-- hand that is no integer starts afresh the same way.
local function next_version()
  local floor = now * 1000
  local v = redis.pcall('HINCRBY', stats_key, 'seq', 1)
  if type(v) ~= 'number' or v <= floor then
    v = floor + 1
    redis.call('HSET', stats_key, 'seq', string.format('%d', v))
  end
  return v
end

-- Queues "<length of id>:<id> <version>\n" for the invalidation published by finish(). With `payload`
-- (a value without a ttl, at most UPDATE_BYTES), the line carries it, "<length of id>:<id> <version>
-- <length of payload>:<payload>\n": a process holding an older copy replaces it instead of dropping it,
-- so a value written elsewhere does not cost every reader a round trip. (A value with a ttl never
-- travels: its deadline is Redis's to keep.)
local UPDATE_BYTES = 1024
local function announce(id, version, payload)
  local line = string.len(id) .. ':' .. id .. ' ' .. string.format('%d', version)
  if payload and string.len(payload) <= UPDATE_BYTES then
    line = line .. ' ' .. string.len(payload) .. ':' .. payload
  end
  changed[#changed + 1] = line .. '\n'
end

-- A fill that started at or before `at` (ms) is refused from now on.
local function fence(id, at)
  redis.call('ZADD', fence_key, at, id)
  noted = true
end

-- The payload bytes an indexed entry accounts for, forgetting them. Unknown (Redis evicted the `size`
-- hash itself): 0, and the totals are recounted at the end of the call (see recount()).
local function take_size(id)
  local size = tonumber(redis.call('HGET', size_key, id))
  if size == nil then
    drifted = true
    return 0
  end
  redis.call('HDEL', size_key, id)
  return size
end

-- Tags. An entry's tags travel as one string, each tag "<length>:<name>" (a name may hold any byte).
local MAX_TAGS, MAX_TAG_BYTES = 64, 256
local function tag_key(name) return base .. 'tag:' .. name end

-- The names in an encoded tag string, or nil when it is malformed (empty names, too many or too long).
local function parse_tags(s)
  local names, pos = {}, 1
  while pos <= string.len(s) do
    local colon = string.find(s, ':', pos, true)
    local len = colon and colon - pos <= 3 and string.match(string.sub(s, pos, colon - 1), '^%d+$')
        and tonumber(string.sub(s, pos, colon - 1))
    if not len or len < 1 or len > MAX_TAG_BYTES or colon + len > string.len(s) then return nil end
    names[#names + 1] = string.sub(s, colon + 1, colon + len)
    pos = colon + len + 1
  end
  if #names > MAX_TAGS then return nil end
  return names
end

-- An error message if a tag's set is a key of another type (written by hand), else nil.
local function check_tag_types(names)
  for _, name in ipairs(names) do
    local actual = redis.call('TYPE', tag_key(name)).ok
    if actual ~= 'set' and actual ~= 'none' then
      return 'VRC_WRONGTYPE ' .. tag_key(name) .. ' holds a ' .. actual .. ', not a set: it was written outside '
          .. 'the cache; delete that key (its tag loses only its index)'
    end
  end
  return nil
end

local tagged = nil                   -- the shard holds tagged entries (nil: not looked up yet)
local function has_tags()
  if tagged == nil then tagged = redis.call('EXISTS', tags_key) == 1 end
  return tagged
end

-- Removes an entry's tag records (before it is removed or rewritten). A tag's set written by hand with
-- another type is skipped (pcall): it indexes nothing the cache wrote.
local function untag(id)
  if not has_tags() then return end
  local encoded = redis.call('HGET', tags_key, id)
  if not encoded then return end
  for _, name in ipairs(parse_tags(encoded) or {}) do redis.pcall('SREM', tag_key(name), id) end
  redis.call('HDEL', tags_key, id)
end

-- Records an entry's tags (`names`, parsed from `encoded`; their sets' types checked by the caller).
local function tag(id, encoded, names)
  for _, name in ipairs(names) do redis.call('SADD', tag_key(name), id) end
  redis.call('HSET', tags_key, id, encoded)
  tagged = true
end

-- Removes an entry from every index and deletes its data. `tier` is 2, 3 or nil (not indexed);
-- `why` is 'deleted', 'evicted', 'idle', 'expired', 'vanished' (Redis dropped its data) or 'corrupt'.
-- Every removal fences fills: a delete those that started up to now; any other removal is not a
-- write, so it fences only those that started before the value stopped being served (`ended`, ms:
-- its expiry or idle deadline; now when unknown), and a fill whose miss saw it gone is accepted.
local function drop(id, tier, why, ended)
  local size = take_size(id)
  if tier == 2 then redis.call('ZREM', l2_key, id); bytes2 = bytes2 - size
  elseif tier == 3 then redis.call('ZREM', l3_key, id); bytes3 = bytes3 - size end
  redis.call('ZREM', exp_key, id)
  redis.call('DEL', entry_key(id))
  untag(id)
  if why == 'deleted' then fence(id, now) else fence(id, math.min(ended or now, now) - 1) end
  if why == 'evicted' then
    redis.call('ZADD', ghost_key, now, id)
    ghosted = true
    ev.evictions = ev.evictions + 1
  elseif why == 'idle' or why == 'expired' or why == 'vanished' then
    ev.expirations = ev.expirations + 1
  end
end

-- Moves an entry from L2 to L3 with the given touch score (nil = a new stamp); its count restarts
-- and its deadline becomes L3's. An entry whose data is gone is removed instead.
local function into_l3(id, score)
  local ek = entry_key(id)
  local f = read_fields(ek, 'ver')
  if not (f and f[1]) then
    drop(id, 2, 'vanished')
    return
  end
  local expiry = tonumber(redis.call('ZSCORE', exp_key, id))  -- when it is removed (z with a grace)
  if expiry and now + 1 >= expiry then            -- its end is (all but) here: it goes, rather than moves
    drop(id, 2, 'expired', expiry)
    return
  end
  score = score or stamp(l3_key)
  redis.call('ZREM', l2_key, id)
  redis.call('ZADD', l3_key, score, id)
  redis.call('HSET', ek, 't', 3, 'n', 0)
  set_deadline(ek, deadline(3, score, expiry), 3, score, true)
  local size = tonumber(redis.call('HGET', size_key, id)) or 0
  bytes2, bytes3 = bytes2 - size, bytes3 + size
  ev.demotions = ev.demotions + 1
end

-- Adds k fleet hits to an entry's count `n` and returns the new count. A count written by hand that is no
-- integer restarts at k (HINCRBY would fail the call midway). (An entry whose value expired in the moment
-- since it was read gets a key holding only the count: its index record, which is there, is a miss for
-- every reader, and whatever removes that record removes the key, as for any entry.)
local function add_hits(ek, k)
  local n = redis.pcall('HINCRBY', ek, 'n', k)
  if type(n) == 'table' then
    redis.call('HSET', ek, 'n', k)
    return k
  end
  return n
end

-- Moves an L3 entry whose fleet hits reached promote_after to L2 (its data exists: checked by the caller).
local function promote(id, ek, expiry)
  if expiry and now + 1 >= expiry then            -- its end is (all but) here: it goes, rather than moves
    drop(id, 3, 'expired', expiry)
    return
  end
  local score = stamp(l2_key)
  redis.call('ZREM', l3_key, id)
  redis.call('ZADD', l2_key, score, id)
  redis.call('HSET', ek, 't', 2)
  set_deadline(ek, deadline(2, score, expiry), 2, score, true)
  local size = tonumber(redis.call('HGET', size_key, id)) or 0
  bytes3, bytes2 = bytes3 - size, bytes2 + size
  ev.promotions = ev.promotions + 1
end

-- The tier an id is indexed in (2, 3 or nil) and its touch score.
local function tier_of(id)
  local s = redis.call('ZSCORE', l2_key, id)
  if s then return 2, tonumber(s) end
  s = redis.call('ZSCORE', l3_key, id)
  if s then return 3, tonumber(s) end
  return nil, nil
end

-- Bounded sweep of due work: absolute expiry, L2 idle -> L3, L3 idle -> gone, old records.
local function sweep()
  local due = redis.call('ZRANGEBYSCORE', exp_key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, SWEEP)
  for i = 1, #due, 2 do
    drop(due[i], (tier_of(due[i])), 'expired', tonumber(due[i + 1]))
  end
  if idle2 > 0 then
    due = redis.call('ZRANGEBYSCORE', l2_key, '-inf', now - idle2, 'WITHSCORES', 'LIMIT', 0, SWEEP)
    for i = 1, #due, 2 do into_l3(due[i], tonumber(due[i + 1]) + idle2) end  -- idle since its last touch + idle2
  end
  if idle3 > 0 then
    due = redis.call('ZRANGEBYSCORE', l3_key, '-inf', now - idle3, 'WITHSCORES', 'LIMIT', 0, SWEEP)
    for i = 1, #due, 2 do drop(due[i], 3, 'idle', tonumber(due[i + 1]) + idle3) end
  end
  local longest = tonumber(redis.call('HGET', stats_key, 'memory')) or 0
  if memory > longest then redis.call('HSET', stats_key, 'memory', memory) else memory = longest end
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

-- Do the byte totals still add up? One `size` record per indexed entry, no negative total, none where
-- a tier is empty. Redis evicting the shard's own keys (an allkeys-* maxmemory policy) breaks that:
-- an index, the `size` hash or the stats hash may vanish whole (the last one is noted by check_head()).
-- O(1): every script that writes asks at its end.
local function needs_recount()
  if drifted then return true end
  local n2, n3 = redis.call('ZCARD', l2_key), redis.call('ZCARD', l3_key)
  if redis.call('HLEN', size_key) ~= n2 + n3 then return true end
  local totals = redis.call('HMGET', stats_key, 'l2_bytes', 'l3_bytes')
  local b2, b3 = tonumber(totals[1]) or 0, tonumber(totals[2]) or 0
  return b2 < 0 or b3 < 0 or (n2 == 0 and b2 ~= 0) or (n3 == 0 and b3 ~= 0)
end

-- Rebuilds the byte totals and the `size` records from the indexes and the entries themselves (the
-- documented repair after Redis evicted some of the shard's own keys): an index member whose data is
-- gone is removed, a missing size record is measured again, a record no index holds is dropped. O(n)
-- in the shard's entries; it runs only when needs_recount() found the totals off.
local function recount()
  local totals, indexed = {0, 0}, {}
  for t, key in ipairs({l2_key, l3_key}) do
    local ids = redis.call('ZRANGE', key, 0, -1)
    for first = 1, #ids, 500 do
      local chunk = {}
      for i = first, math.min(first + 499, #ids) do chunk[#chunk + 1] = ids[i] end
      local sizes = redis.call('HMGET', size_key, unpack(chunk))
      for i, id in ipairs(chunk) do
        local size = tonumber(sizes[i])
        local ek = entry_key(id)
        if redis.call('EXISTS', ek) == 0 then
          redis.call('ZREM', key, id)
          redis.call('ZREM', exp_key, id)
          redis.call('HDEL', size_key, id)
          untag(id)
        else
          if size == nil then
            size = tonumber((redis.pcall('HSTRLEN', ek, 'v'))) or 0
            redis.call('HSET', size_key, id, size)
          end
          totals[t] = totals[t] + size
          indexed[id] = true
        end
      end
    end
  end
  for _, id in ipairs(redis.call('HKEYS', size_key)) do
    if not indexed[id] then redis.call('HDEL', size_key, id) end
  end
  redis.call('HSET', stats_key, 'l2_bytes', totals[1], 'l3_bytes', totals[2])
  count('recounts', 1)
end

-- Writes this call's counters and byte deltas into the shard's stats, bounds the records and
-- publishes the invalidations (one place, at the end). Returns the events reply, with `now`.
local function finish(extra)
  local deltas = {l2_bytes = bytes2, l3_bytes = bytes3, promotions = ev.promotions, demotions = ev.demotions,
                  evictions = ev.evictions, expirations = ev.expirations}
  for field, d in pairs(extra) do deltas[field] = d end
  for field, d in pairs(deltas) do
    if d ~= 0 then count(field, d) end
  end
  if ghosted then redis.call('ZREMRANGEBYRANK', ghost_key, 0, -(sizing_step() + 1)) end
  if noted then
    -- Past the bound the oldest records are dropped, but not forgotten: the newest dropped time
    -- becomes a floor below which every fill is refused.
    local over = redis.call('ZCARD', fence_key) - math.max(cap2 + cap3, RECORDS_MAX)
    if over > 0 then
      local last = redis.call('ZRANGE', fence_key, over - 1, over - 1, 'WITHSCORES')
      redis.call('HSET', stats_key, 'fence_floor', last[2])
      redis.call('ZREMRANGEBYRANK', fence_key, 0, over - 1)
    end
  end
  if drifted or (check_totals and needs_recount()) then recount() end
  if #changed > 0 then redis.call('SPUBLISH', channel, table.concat(changed)) end
  return {ev.promotions, ev.demotions, ev.evictions, ev.expirations, now}
end
