#!lua
--[[
  record.lua: learn from one query of a session, atomically: transition and n-gram counts (previous
  queries -> this one), the hour's counts, the query's tools, the session's history, and the verdict
  on the prediction made for this session (was this query among the predicted?).

  KEYS[1]  P stats            HASH  (see includes/model.lua for every key)
  KEYS[2]  P patterns         ZSET
  KEYS[3]  P queries          ZSET
  KEYS[4]  P tools            HASH
  KEYS[5]  P evicted          ZSET
  KEYS[6]  P hist:<session>   LIST
  KEYS[7]  P pred:<session>   HASH
  KEYS[8]  P hour:<HH>        ZSET  the current UTC hour's counts
  KEYS[9]  P sketch:0         STRING  the frequency sketch of even epochs (see "Admission" below)
  KEYS[10] P sketch:1         STRING  the frequency sketch of odd epochs
  KEYS[11] P obs              HASH    observations of each pattern and hour set (see "Decay" below)
  KEYS[12 .. 11+c]            the context patterns the caller derived from the history it expects:
                              P next:<previous query>, then P ngram:<...> for n = 3, 4, ... (c of them)
  KEYS[12+c ..]               evicted patterns to delete now (names an earlier call returned, at most
                              64): each is deleted only if it has not been registered again since

  ARGV[1]   query (non-empty bytes)
  ARGV[2]   tools, a JSON list ('' = keep what is stored)
  ARGV[3]   session ttl, ms (>= 1): history and pending prediction expire this long after last use
  ARGV[4]   history kept, queries (= ngram_size - 1, >= 1)
  ARGV[5]   max_patterns (>= 1): pattern sets registered at most
  ARGV[6]   max_successors (>= 1): members kept per pattern set
  ARGV[7]   decay per observation of a pattern (0 < decay <= 1)
  ARGV[8]   decay per observation of an hour set (0 < decay <= 1)
  ARGV[9]   members kept per hour set (>= 1)
  ARGV[10]  max_queries (>= 1): queries whose tools are kept, at most
  ARGV[11]  pattern ttl, ms (>= 1): a pattern set not updated this long expires (a safety net)
  ARGV[12]  sketch width, counters per row (1 .. 2^26); each sketch is 4 rows of 4-bit counters,
            4 * width / 2 bytes
  ARGV[13]  sketch epoch, records (>= 1): the sketches rotate every this many records (the `tick`)
  ARGV[14]  c, the number of context keys (0 .. 64)
  ARGV[15]  h, the number of history entries the caller expects (0 .. ARGV[4])
  ARGV[16 .. 15+h]  that history, newest first

  The pending prediction of the session is judged by this query, unless it was made after this very
  query before it was recorded (predict, then record the current query): then it waits for the next.

  Admission (TinyLFU's admission filter, shared by the fleet). Every record counts each of its
  context patterns and its query ('q:' .. query) in a count-min sketch: 4 rows of `width` saturating
  4-bit counters, an item's counter in row r picked by hex digits 8r+1 .. 8r+8 of the SHA1 of its
  name, modulo the width; its estimate is the least over the rows of the counter's value in both
  sketches (this epoch's and the previous one's). While `patterns` has room every new pattern set is
  registered. Once it is full a new one is registered only if its estimate beats that of the set
  eviction would drop (the least recently updated n-gram set, unless the least recently updated
  transition set has left the sketch altogether), which is dropped; otherwise nothing of it is
  written and nothing is evicted. `queries` (and with it `tools`) is bounded the same way, against its least
  recently recorded query.
  Why: with recency alone, agent traffic's long tail of queries asked once (each bringing new
  pattern sets) pushes the recurring workflows' sets out between two of their uses. A frequency
  estimate tells the recurring from the one-off in fixed memory whatever the number of distinct
  queries, and a refused pattern gets no key. A tie keeps the incumbent, so a stream of one-offs does
  not churn the sets. No admission window (W-TinyLFU's small LRU in front): recurring patterns recur
  hundreds of records apart, so a window small enough to be cheap would admit nothing useful; a new
  recurring pattern enters with its second (or third) observation instead, the first only counted.
  Aging: the current epoch is floor(tick / ARGV[13]); its sketch takes the increments (KEYS[9] for
  even epochs, KEYS[10] for odd). At a new epoch the older sketch is deleted and counts afresh (one
  DEL, not a pass over the counters), so an estimate covers the last 1 to 2 epochs of traffic and a
  pattern nobody uses any more loses to any newcomer after 2 epochs. Only the rows holding the least
  value are raised (a conservative update), which keeps one-offs' estimates low; still, late in an
  epoch a few per cent of one-offs rate 2 (all 4 of their counters raised by others) and may replace
  a one-off, never a pattern seen more often. Counters are read only with the width and epoch length
  they were written with (kept in `stats`): a call with others (changed settings) starts afresh.

  Decay, applied forward: the n-th observation of a set adds w = decay^(1-n) to the query's score (n
  kept in `obs`), instead of first multiplying every score of the set by `decay` and adding 1. Each
  score is then decay^(1-n) times the decayed count includes/model.lua defines (after one observation,
  the same), so every ratio within a set, all a prediction reads, is the same, and an observation costs
  one HINCRBY where the multiplication rewrote the whole set (a ZUNIONSTORE: most of this script's
  time). Counts below MIN_COUNT are dropped as before (scores below MIN_COUNT * w). Before w outgrows
  2^300 the set is scaled back to plain counts once, and n starts again. A set without an `obs` field
  (no decay, or written before it) holds plain counts. A field goes when its set's key is deleted.

  Reply: {0, {stored history}}          the history differs from the expected one: nothing written;
                                        the caller derives the context keys again and retries
         {1, verdict, {pending names}}  recorded. verdict: -1 = nothing judged, 0 = the query was not
                                        predicted, 1 = it was. Pending names (at most 64, key names
                                        without P) are evicted patterns whose keys the caller deletes
                                        with its next call (as KEYS[12+c..]); they also expire after
                                        the pattern ttl.
]]
-- @include "includes/model.lua"

local stats_key, patterns_key, queries_key, tools_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local evicted_key, hist_key, pred_key, hour_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local obs_key = KEYS[11]
local query, tools = ARGV[1], ARGV[2]
local session_ttl, keep = arg_int(3, 1, 1e15), arg_int(4, 1, 64)
local max_patterns, max_successors = arg_int(5, 1, 1e9), arg_int(6, 1, 1e6)
local decay, hour_decay = arg_number(7, 1e-9, 1), arg_number(8, 1e-9, 1)
local hour_size, max_queries, pattern_ttl = arg_int(9, 1, 1e9), arg_int(10, 1, 1e9), arg_int(11, 1, 1e15)
-- 2^26 counters per row keeps the last counter's bit offset (4 rows of 4 bits) under BITFIELD's 2^32.
local width, epoch_records = arg_int(12, 1, 2^26), arg_int(13, 1, 1e15)
local c, h = arg_int(14, 0, 64), arg_int(15, 0, 64)
local FIRST = 12                      -- KEYS[FIRST .. FIRST+c-1]: the context patterns
local NGRAM_RANK = 1e15               -- subtracted from an n-gram set's tick in `patterns` (see below)
local ROWS, SATURATED = 4, 15         -- the sketch's rows, and the largest value of a u4 counter

if string.len(query) == 0 or not (session_ttl and keep and max_patterns and max_successors and decay
    and hour_decay and hour_size and max_queries and pattern_ttl and width and epoch_records and c and h)
    or h > keep or #KEYS < FIRST - 1 + c or #KEYS > FIRST - 1 + c + 64 or #ARGV ~= 15 + h then
  return redis.error_reply('VRC_BADARG record: empty query, or a count, ttl, decay or sketch size out of '
      .. 'range, or KEYS/ARGV lengths that do not match c and h')
end
local wrong = preflight({'hash', 'zset', 'zset', 'hash', 'zset', 'list', 'hash', 'zset', 'string', 'string', 'hash'})
if wrong then return redis.error_reply(wrong) end

local same, stored = history_matches(hist_key, keep, 16, h)
if not same then return {0, stored} end

local tick = redis.call('HINCRBY', stats_key, 'tick', 1)

-- The sketches' epoch: the one of the current epoch takes the increments. At the next epoch the
-- older one is deleted and takes them from zero; after a gap of more than one epoch both are stale.
-- Counters are only read with the shape they were written with: a call with another width or epoch
-- length (the settings changed) starts both afresh.
local epoch = math.floor(tick / epoch_records)
local current, previous = KEYS[9 + epoch % 2], KEYS[10 - epoch % 2]
local marks = redis.call('HMGET', stats_key, 'sketch_epoch', 'sketch_width', 'sketch_records')
local last_epoch, reshaped = tonumber(marks[1]), tonumber(marks[2]) ~= width or tonumber(marks[3]) ~= epoch_records
if last_epoch ~= epoch or reshaped then
  redis.call('DEL', current)
  if last_epoch ~= epoch - 1 or reshaped then redis.call('DEL', previous) end
  redis.call('HSET', stats_key, 'sketch_epoch', epoch, 'sketch_width', width, 'sketch_records', epoch_records)
end

-- The sketch counters of an item, one per row: 32 bits of its SHA1 per row pick the column.
local cell_memo = {}
local function cells(item)
  local out = cell_memo[item]
  if out then return out end
  local sha = redis.sha1hex(item)
  out = {}
  for r = 0, ROWS - 1 do
    out[r + 1] = r * width + tonumber(string.sub(sha, 8 * r + 1, 8 * r + 8), 16) % width
  end
  cell_memo[item] = out
  return out
end

-- The counters this call has read, by index: this epoch's (with this call's increments, which are
-- written once, by write_counts) and the previous epoch's. Reading every item of the call at once
-- takes two BITFIELD calls instead of two per item.
local now_at, before_at, added, added_order = {}, {}, {}, {}
local function load(items)
  local get, order, asked = {}, {}, {}
  for _, item in ipairs(items) do
    for _, at in ipairs(cells(item)) do
      if now_at[at] == nil and not asked[at] then
        asked[at] = true
        order[#order + 1] = at
        local n = #get
        get[n + 1], get[n + 2], get[n + 3] = 'GET', 'u4', '#' .. at
      end
    end
  end
  if #order == 0 then return end
  local now, before = redis.call('BITFIELD', current, unpack(get)), redis.call('BITFIELD', previous, unpack(get))
  for i, at in ipairs(order) do now_at[at], before_at[at] = now[i], before[i] end
end

-- Each row's count over both epochs, and the item's estimate: the least of them.
local function counts(item)
  load({item})
  local at, sums, least = cells(item), {}, nil
  for r = 1, ROWS do
    sums[r] = now_at[at[r]] + before_at[at[r]]
    if not least or sums[r] < least then least = sums[r] end
  end
  return at, sums, least
end

local function estimate(item)
  local _, _, least = counts(item)
  return least
end

-- One more observation of an item; returns its new estimate. Only the rows holding the least count
-- are raised (a conservative update): the others already count it, with other items' observations.
local function count(item)
  local at, sums, least = counts(item)
  local after = nil
  for r = 1, ROWS do
    local v = sums[r]
    if v == least and now_at[at[r]] < SATURATED then
      now_at[at[r]] = now_at[at[r]] + 1
      if not added[at[r]] then added_order[#added_order + 1] = at[r] end
      added[at[r]] = (added[at[r]] or 0) + 1
      v = v + 1
    end
    if not after or v < after then after = v end
  end
  return after
end

-- This call's increments, in one BITFIELD. The final INCRBY of 0 on the last counter makes the string
-- its full, fixed size from the start.
local function write_counts()
  local incr = {'OVERFLOW', 'SAT'}
  for _, at in ipairs(added_order) do
    local n = #incr
    incr[n + 1], incr[n + 2], incr[n + 3], incr[n + 4] = 'INCRBY', 'u4', '#' .. at, added[at]
  end
  local n = #incr
  incr[n + 1], incr[n + 2], incr[n + 3], incr[n + 4] = 'INCRBY', 'u4', '#' .. (ROWS * width - 1), 0
  redis.call('BITFIELD', current, unpack(incr))
end

-- The verdict on the prediction pending for this session (see the header).
local verdict = -1
local made_after = redis.call('HGET', pred_key, 'for')
if made_after and (made_after ~= query or made_after == stored[1]) then
  verdict = redis.call('HEXISTS', pred_key, 'q:' .. query)
  redis.call('DEL', pred_key)
  redis.call('HINCRBY', stats_key, 'predictions_total', 1)
  if verdict == 1 then redis.call('HINCRBY', stats_key, 'predictions_correct', 1) end
end

-- One observation of `query` in a decayed, bounded set (forward decay: see "Decay" in the header); the
-- member just seen always stays. %.17g: Lua would format a number with 14 digits only.
local RESCALE = 300 * math.log(2)     -- w = decay^-n stays under 2^300
local function observe(key, d, size)
  local w = 1
  if d < 1 then
    local name = string.sub(key, #P + 1)
    local n = redis.call('HINCRBY', obs_key, name, 1)
    if (n - 1) * -math.log(d) > RESCALE then   -- back to plain counts (as after observation 1), then this one
      redis.call('ZUNIONSTORE', key, 1, key, 'WEIGHTS', string.format('%.17g', d ^ (n - 2)))
      redis.call('HSET', obs_key, name, 2)
      n = 2
    end
    w = d ^ (1 - n)
  end
  redis.call('ZINCRBY', key, string.format('%.17g', w), query)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.17g', MIN_COUNT * w))
  local over = redis.call('ZCARD', key) - size
  while over > 0 do
    local lowest = redis.call('ZRANGE', key, 0, 1)
    redis.call('ZREM', key, lowest[1] == query and lowest[2] or lowest[1])
    over = over - 1
  end
end

-- The first of `members` (lowest-ranked first) that is not one of this call's own patterns.
local mine = {}
for i = FIRST, FIRST - 1 + c do mine[string.sub(KEYS[i], #P + 1)] = true end
local function first_other(members)
  for _, member in ipairs(members) do
    if not mine[member] then return member end
  end
  return nil
end

-- The pattern set eviction would drop, with its estimate: the least recently updated n-gram set (they
-- rank below every transition set: a transition is what every prediction starts from, an n-gram only
-- sharpens it), unless the least recently updated transition set has left the sketch altogether
-- (rated 0: not seen for 2 epochs). Without that exception a transition set nobody asks for any more
-- would hold its slot for as long as any n-gram set is registered.
local function pattern_victim()
  local transition = first_other(redis.call('ZRANGE', patterns_key, 0, '+inf', 'BYSCORE', 'LIMIT', 0, c + 1))
  local seen = transition and estimate(transition)
  if seen == 0 then return transition, 0 end
  local ngram = first_other(redis.call('ZRANGE', patterns_key, '-inf', '(0', 'BYSCORE', 'LIMIT', 0, c + 1))
  if ngram then return ngram, estimate(ngram) end
  return transition, seen
end

-- TinyLFU's admission: a new item (estimated `freq`) takes the victim's place only if it is seen more
-- often; a tie keeps the victim, as an item seen as often as the one it would replace brings nothing
-- better (and a stream of one-offs would otherwise churn the set).
local function beats(freq, victim, victim_freq)
  return victim ~= nil and freq > victim_freq
end

-- Every item this call counts, read at once: its context patterns, then its query.
local items = {}
for i = FIRST, FIRST - 1 + c do items[#items + 1] = string.sub(KEYS[i], #P + 1) end
items[#items + 1] = 'q:' .. query
load(items)

local rejected = 0
for i = FIRST, FIRST - 1 + c do
  local name = string.sub(KEYS[i], #P + 1)
  local freq = count(name)
  local known = redis.call('ZSCORE', patterns_key, name)
  if not known and redis.call('ZCARD', patterns_key) >= max_patterns then
    local victim, victim_freq = pattern_victim()
    if beats(freq, victim, victim_freq) then
      -- Dropped from the registry now; its key is deleted by the next call of any worker (below).
      redis.call('ZREM', patterns_key, victim)
      redis.call('ZADD', evicted_key, tick, victim)
      known = true
    end
  else
    known = true
  end
  if known then
    observe(KEYS[i], decay, max_successors)
    redis.call('PEXPIRE', KEYS[i], pattern_ttl)
    redis.call('ZADD', patterns_key, i == FIRST and tick or tick - NGRAM_RANK, name)
    redis.call('ZREM', evicted_key, name)            -- evicted earlier, in use again: keep its key
  else
    rejected = rejected + 1
  end
end
if rejected > 0 then redis.call('HINCRBY', stats_key, 'patterns_rejected', rejected) end
observe(hour_key, hour_decay, hour_size)
redis.call('PEXPIRE', hour_key, pattern_ttl)

-- Tools of at most max_queries queries: the most recently recorded, among those admitted.
local qfreq = count('q:' .. query)     -- 'q:' keeps a query apart from pattern names in the sketch
local listed = redis.call('ZSCORE', queries_key, query)
if not listed and redis.call('ZCARD', queries_key) >= max_queries then
  local victim = redis.call('ZRANGE', queries_key, 0, 0)[1]   -- the least recently recorded
  if beats(qfreq, victim, victim and estimate('q:' .. victim)) then
    redis.call('ZREM', queries_key, victim)
    redis.call('HDEL', tools_key, victim)
    listed = true
  end
else
  listed = true
end
if listed then
  redis.call('ZADD', queries_key, tick, query)
  if tools ~= '' then redis.call('HSET', tools_key, query, tools) end
else
  redis.call('HINCRBY', stats_key, 'queries_rejected', 1)
end
write_counts()
local over = redis.call('ZCARD', queries_key) - max_queries
if over > 0 then                       -- max_queries was lowered: the least recently recorded go
  for _, q in ipairs(redis.call('ZRANGE', queries_key, 0, over - 1)) do redis.call('HDEL', tools_key, q) end
  redis.call('ZREMRANGEBYRANK', queries_key, 0, over - 1)
end

-- The session's history, newest first.
redis.call('LPUSH', hist_key, query)
redis.call('LTRIM', hist_key, 0, keep - 1)
redis.call('PEXPIRE', hist_key, session_ttl)

-- More than max_patterns pattern sets only when max_patterns was lowered: the least recently updated
-- are dropped from the registry now (so they no longer count) and noted in `evicted`. Evicted keys
-- are deleted by the next call of any worker (a script may only touch keys its caller declares),
-- else expire after the pattern ttl.
over = redis.call('ZCARD', patterns_key) - max_patterns
if over > 0 then
  for _, name in ipairs(redis.call('ZRANGE', patterns_key, 0, over - 1)) do
    redis.call('ZADD', evicted_key, tick, name)
  end
  redis.call('ZREMRANGEBYRANK', patterns_key, 0, over - 1)
end
for i = FIRST + c, #KEYS do
  local name = string.sub(KEYS[i], #P + 1)
  if not redis.call('ZSCORE', patterns_key, name) then
    redis.call('DEL', KEYS[i])
    redis.call('HDEL', obs_key, name)
  end
  redis.call('ZREM', evicted_key, name)
end

redis.call('HINCRBY', stats_key, 'records', 1)
return {1, verdict, redis.call('ZRANGE', evicted_key, 0, 63)}
