--[[
  includes/model.lua: the prediction model prelude, pasted at the top of record.lua and predict.lua.

  Every key of a namespace's model shares the hash tag {<ns>.model}, so each script call touches one
  hash slot. With P = <ns>:{<ns>.model}: the keys are

    P stats            HASH  fleet counters: records, predictions_total, predictions_correct, tick;
                             patterns_rejected, queries_rejected (what admission kept out); the
                             sketches' sketch_epoch, sketch_width and sketch_records (records per epoch)
    P patterns         ZSET  member = pattern name (a key name without P), score = tick of its last update
                             (minus 1e15 for n-gram sets: evicted before any transition set)
    P sketch:0         STRING  count-min sketch of the even epochs: 4 rows of `width` u4 counters (row r,
                             column j is counter r * width + j, BITFIELD's u4 #index); fixed size
    P sketch:1         STRING  the same for the odd epochs (see record.lua, "Admission")
    P evicted          ZSET  pattern names dropped from `patterns` whose keys are still to be deleted
                             (by the next record call of any worker; score = tick of the eviction)
    P queries          ZSET  member = query, score = tick it was last recorded (bounds `tools`; admitted
                             like pattern sets)
    P tools            HASH  query -> JSON list of the tools its latest selection used
    P next:<q>         ZSET  member = a query that followed q, score = decayed count  (transition, 2-gram)
    P ngram:<ctx>      ZSET  the same after a session's last n-1 queries (n >= 3); <ctx> is each query
                             as <byte length>:<query>, joined by '|' (oldest first)
    P hour:<HH>        ZSET  member = query, score = decayed count of queries recorded in that UTC hour
    P hist:<session>   LIST  the session's last ngram_size-1 queries, newest first (expires)
    P pred:<session>   HASH  the prediction pending for the session (expires): `for` = the query it was
                             made after, `q:<query>` = 1 for each predicted query
    P obs              HASH  set name (pattern or hour) -> its observations n (forward decay's scale)

  Queries over 1 KiB (or starting with '#') appear in key names as '#' + SHA-256 hex of the query;
  members always hold the query itself.

  Counts decay: each observation of a pattern first multiplies all its counts by `decay`, then adds 1,
  so a count is an exponentially weighted number of recent observations and a changed workload
  overtakes the old one within a bounded number of observations of that pattern. record.lua applies
  it forward: a set's scores are those counts times decay^(1-n), the same ratios (see its header).
]]

-- @include "includes/acl.lua"

local P = string.sub(KEYS[1], 1, -6)   -- KEYS[1] is always P .. 'stats'
-- Every command the model scripts run (see includes/acl.lua).
local MODEL_COMMANDS = {'type', 'del', 'hget', 'hmget', 'hset', 'hdel', 'hincrby', 'lrange', 'lpush', 'ltrim',
                        'pexpire', 'hexists', 'zadd', 'zrem', 'zincrby', 'zunionstore', 'zrange', 'zcard',
                        'zscore', 'zmscore', 'zremrangebyscore', 'zremrangebyrank', 'bitfield'}
local MIN_COUNT = 0.001                -- decayed counts below this are dropped

local function arg_number(i, lo, hi)
  local v = tonumber(ARGV[i])
  if v == nil or v ~= v or v < lo or v > hi then return nil end
  return v
end

local function arg_int(i, lo, hi)
  local v = arg_number(i, lo, hi)
  if v == nil or math.floor(v) ~= v then return nil end
  return v
end

-- The first error among the commands the user may not run and the KEYS of the wrong type (absent
-- keys are fine): KEYS[i] must be a types[i], every key after those a zset. Before the first write.
local function preflight(types)
  local denied = check_commands(MODEL_COMMANDS, KEYS[1], nil)
  if denied then return denied end
  local checked = {}
  for i = 1, #KEYS do
    local want = types[i] or 'zset'
    local t = checked[KEYS[i]] or redis.call('TYPE', KEYS[i])['ok']
    checked[KEYS[i]] = t
    if t ~= 'none' and t ~= want then
      return 'VRC_WRONGTYPE ' .. KEYS[i] .. ' is a ' .. t .. ', the prediction model needs a ' .. want
    end
  end
  return nil
end

-- A session's history as stored (newest first) equals the `count` entries the caller built its keys
-- from, ARGV[first ..]?
local function history_equals(stored, first, count)
  if #stored ~= count then return false end
  for i = 1, count do
    if stored[i] ~= ARGV[first + i - 1] then return false end
  end
  return true
end

-- The same, read from the session's list (its first `keep` entries); also returns the stored history.
local function history_matches(hist_key, keep, first, count)
  local stored = redis.call('LRANGE', hist_key, 0, keep - 1)
  return history_equals(stored, first, count), stored
end

-- All of a pattern set as {member, count} pairs and the sum of the counts.
local function distribution(key)
  local flat = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local out, total = {}, 0
  for i = 1, #flat, 2 do
    local c = tonumber(flat[i + 1])
    out[flat[i]] = c
    total = total + c
  end
  return out, total
end
