#!lua
--[[
  record.lua: learn from a batch of queries (one or more sessions, in the order they were asked),
  atomically: for each, its transition and n-gram counts (previous queries -> this one), the hour's
  counts, its tools, the session's history, and the verdict on the prediction made for its session
  (was this query among the predicted?). One call per model round: what every record shares (the
  checks, the counters, the sketches, the registries) is read and written once per call.

  KEYS[1]  P stats            HASH  (see includes/model.lua for every key)
  KEYS[2]  P patterns         ZSET
  KEYS[3]  P queries          ZSET
  KEYS[4]  P tools            HASH
  KEYS[5]  P evicted          ZSET
  KEYS[6]  P sketch:0         STRING  the frequency sketch of even epochs (see "Admission" below)
  KEYS[7]  P sketch:1         STRING  the frequency sketch of odd epochs
  KEYS[8]  P obs              HASH    observations of each pattern and hour set (see "Decay" below)
  then, for each record i = 1 .. R, in order:
           P hist:<session>   LIST
           P pred:<session>   HASH
           P hour:<HH>        ZSET  the UTC hour the query was asked in
           c_i context patterns the caller derived from the history it expects: P next:<previous
           query>, then P ngram:<...> for n = 3, 4, ...
  then D evicted patterns to delete now (names an earlier call returned, at most 64): each is deleted
           only if it has not been registered again since

  ARGV[1]   session ttl, ms (>= 1): history and pending prediction expire this long after last use
  ARGV[2]   history kept, queries (= ngram_size - 1, 1 .. 64)
  ARGV[3]   max_patterns (>= 1): pattern sets registered at most
  ARGV[4]   max_successors (>= 1): members kept per pattern set
  ARGV[5]   decay per observation of a pattern (0 < decay <= 1)
  ARGV[6]   decay per observation of an hour set (0 < decay <= 1)
  ARGV[7]   members kept per hour set (>= 1)
  ARGV[8]   max_queries (>= 1): queries whose tools are kept, at most
  ARGV[9]   pattern ttl, ms (>= 1): a pattern set not updated this long expires (a safety net)
  ARGV[10]  sketch width, counters per row (1 .. 2^26); each sketch is 4 rows of 4-bit counters,
            4 * width / 2 bytes
  ARGV[11]  sketch epoch, records (>= 1): the sketches rotate every this many records (the `tick`)
  ARGV[12]  R, the number of records (1 .. 64)
  ARGV[13]  D, the number of evicted patterns to delete (0 .. 64)
  then, for each record i: query (non-empty bytes); tools, a JSON list ('' = keep what is stored);
            c_i (0 .. 64); h_i, the number of history entries the caller expects (0 .. ARGV[2]);
            that history (h_i entries, newest first)

  A record is applied only if the session's history, as Redis holds it after the batch's earlier
  records, is the one its caller expected; otherwise nothing of it is written (nor of the session's
  later records in the batch, whose expected history includes it) and its reply carries the stored
  history. The pending prediction of the session is judged by the query, unless it was made after
  this very query before it was recorded (predict, then record the current query): then it waits for
  the next.

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
  Aging: the current epoch is floor(tick / ARGV[11]), tick being the batch's first record's; its
  sketch takes the increments (KEYS[6] for even epochs, KEYS[7] for odd). At a new epoch the older sketch is deleted and counts afresh (one
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
  time); a batch reads the `obs` fields it needs once and writes them once. Counts below MIN_COUNT
  (scores below MIN_COUNT * w) are dropped when the set takes a new member and at every 16th
  observation, not at each one: until then a prediction may still see them, at under MIN_COUNT. Before w outgrows
  2^300 the set is scaled back to plain counts once, and n starts again. A set without an `obs` field
  (no decay, or written before it) holds plain counts. A field goes when its set's key is deleted.

  Reply: {replies, pending names}
         replies[i] = {0, {stored history}}  record i's session history differs from the expected one:
                                             nothing of it written; the caller derives its context
                                             keys again and resends it
                      {1, verdict}           recorded. verdict: -1 = nothing judged, 0 = the query was
                                             not predicted, 1 = it was
         pending names (at most 64, key names without P): evicted patterns whose keys the caller
         deletes with its next call; they also expire after the pattern ttl.
]]
-- @include "includes/model.lua"

local stats_key, patterns_key, queries_key, tools_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local evicted_key, obs_key = KEYS[5], KEYS[8]
local session_ttl, keep = arg_int(1, 1, 1e15), arg_int(2, 1, 64)
local max_patterns, max_successors = arg_int(3, 1, 1e9), arg_int(4, 1, 1e6)
local decay, hour_decay = arg_number(5, 1e-9, 1), arg_number(6, 1e-9, 1)
local hour_size, max_queries, pattern_ttl = arg_int(7, 1, 1e9), arg_int(8, 1, 1e9), arg_int(9, 1, 1e15)
-- 2^26 counters per row keeps the last counter's bit offset (4 rows of 4 bits) under BITFIELD's 2^32.
local width, epoch_records = arg_int(10, 1, 2^26), arg_int(11, 1, 1e15)
local R, D = arg_int(12, 1, 64), arg_int(13, 0, 64)
local FIXED_KEYS, FIXED_ARGS = 8, 13
local NGRAM_RANK = 1e15               -- subtracted from an n-gram set's tick in `patterns` (see below)
local ROWS, SATURATED = 4, 15         -- the sketch's rows, and the largest value of a u4 counter
local TRIM_EVERY = 16                 -- a set's low counts are dropped at least every this many observations

local function bad(why)
  return redis.error_reply('VRC_BADARG record: ' .. why)
end
if not (session_ttl and keep and max_patterns and max_successors and decay and hour_decay and hour_size
    and max_queries and pattern_ttl and width and epoch_records and R and D) then
  return bad('a count, ttl, decay or sketch size out of range (or no records, or over 64)')
end

-- Every record's place in KEYS and ARGV, checked against both lengths before anything is read.
local records, types = {}, {'hash', 'zset', 'zset', 'hash', 'zset', 'string', 'string', 'hash'}
local k, a = FIXED_KEYS, FIXED_ARGS
for i = 1, R do
  local query, tools, c, h = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if not (c and h and c == math.floor(c) and h == math.floor(h) and c >= 0 and c <= 64 and h >= 0 and h <= keep)
      or query == nil or string.len(query) == 0 or tools == nil then
    return bad('record ' .. i .. ' has an empty query, or a context or history count out of range')
  end
  local rec = {query = query, tools = tools, c = c, h = h, hist = KEYS[k + 1], pred = KEYS[k + 2],
               hour = KEYS[k + 3], first_context = k + 4, first_history = a + 5}
  types[k + 1], types[k + 2] = 'list', 'hash'
  records[i] = rec
  k, a = k + 3 + c, a + 4 + h
end
if #KEYS ~= k + D or #ARGV ~= a then
  return bad('KEYS/ARGV lengths that do not match R, D and each record\'s c and h')
end
local first_doomed = k + 1
local wrong = preflight(types)
if wrong then return redis.error_reply(wrong) end

local last_tick = redis.call('HINCRBY', stats_key, 'tick', R)
local first_tick = last_tick - R + 1

-- The sketches' epoch (the batch's first record's): the one of the current epoch takes the
-- increments. At the next epoch the older one is deleted and takes them from zero; after a gap of
-- more than one epoch both are stale. Counters are only read with the shape they were written with: a
-- call with another width or epoch length (the settings changed) starts both afresh.
local epoch = math.floor(first_tick / epoch_records)
local current, previous = KEYS[6 + epoch % 2], KEYS[7 - epoch % 2]
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
-- written once, by write_counts) and the previous epoch's. Reading every item of the batch at once
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

-- What the batch reads once and then keeps up to date itself: the registries' members (true/false by
-- name), their sizes, every set's observations, each session's history and pending prediction.
local function member_table(key, names)
  local out, list = {}, {}
  for name in pairs(names) do list[#list + 1] = name end
  if #list > 0 then
    local scores = redis.call('ZMSCORE', key, unpack(list))
    for i, name in ipairs(list) do out[name] = scores[i] ~= false end
  end
  return out
end

local context_names, query_names, set_names, items = {}, {}, {}, {}
for _, rec in ipairs(records) do
  for j = rec.first_context, rec.first_context + rec.c - 1 do
    local name = string.sub(KEYS[j], #P + 1)
    context_names[name] = true
    set_names[name] = true
    items[#items + 1] = name
  end
  query_names[rec.query] = true
  set_names[string.sub(rec.hour, #P + 1)] = true
  items[#items + 1] = 'q:' .. rec.query     -- 'q:' keeps a query apart from pattern names in the sketch
end
local registered, listed_queries = member_table(patterns_key, context_names), member_table(queries_key, query_names)
local pattern_count, query_count = redis.call('ZCARD', patterns_key), redis.call('ZCARD', queries_key)
load(items)

local observations, obs_changed = {}, {}     -- set name -> n (false: no field)
do
  local list = {}
  for name in pairs(set_names) do list[#list + 1] = name end
  local got = redis.call('HMGET', obs_key, unpack(list))
  for i, name in ipairs(list) do observations[name] = tonumber(got[i]) or false end
end

local sessions = {}                           -- hist key -> {stored = history, pred = made-after or false, pushed = {}}
local function session(rec)
  local s = sessions[rec.hist]
  if not s then
    s = {stored = redis.call('LRANGE', rec.hist, 0, keep - 1), pushed = {}, pred_key = rec.pred}
    s.pred = redis.call('HGET', rec.pred, 'for')
    sessions[rec.hist] = s
  end
  return s
end

-- Writes every record of the batch makes to the same key are gathered and sent once, at the end.
local pattern_ticks, pattern_order = {}, {}   -- name -> tick for `patterns` (ZADD)
local query_ticks, query_order = {}, {}       -- query -> tick for `queries` (ZADD)
local tools_of = {}                           -- query -> tools JSON (HSET)
local touched, touched_order = {}, {}         -- set key -> {name, decay, size, last member, grew}

local function flush_registry(key, ticks, order)
  if #order == 0 then return end
  local args = {}
  for _, name in ipairs(order) do args[#args + 1] = ticks[name]; args[#args + 1] = name end
  redis.call('ZADD', key, unpack(args))
  for name in pairs(ticks) do ticks[name] = nil end
  for i = #order, 1, -1 do order[i] = nil end
end

local function note(ticks, order, name, tick)
  if ticks[name] == nil then order[#order + 1] = name end
  ticks[name] = tick
end

-- One observation of `query` in a decayed, bounded set (forward decay: see "Decay" in the header).
-- Low counts and members over `size` are dropped at the end of the batch (drop_low), where the member
-- seen last always stays. %.17g: Lua would format a number with 14 digits only.
local RESCALE = 300 * math.log(2)     -- w = decay^-n stays under 2^300
local function observe(key, d, size, query)
  local name = string.sub(key, #P + 1)
  local w, n = 1, false
  if d < 1 then
    n = (observations[name] or 0) + 1
    if (n - 1) * -math.log(d) > RESCALE then   -- back to plain counts (as after observation 1), then this one
      redis.call('ZUNIONSTORE', key, 1, key, 'WEIGHTS', string.format('%.17g', d ^ (n - 2)))
      n = 2
    end
    observations[name] = n
    obs_changed[name] = true
    w = d ^ (1 - n)
  end
  local score = tonumber(redis.call('ZINCRBY', key, string.format('%.17g', w), query))
  local t = touched[key]
  if not t then
    t = {}
    touched[key] = t
    touched_order[#touched_order + 1] = key
  end
  t.w, t.size, t.last = w, size, query
  -- A new member (its score is this observation's weight alone) may take the set over its size; and
  -- every TRIM_EVERY-th observation the counts decayed below MIN_COUNT go (plain-count sets keep theirs).
  if score <= w * (1 + 1e-9) or (n and n % TRIM_EVERY == 0) then t.trim = true end
end

local function drop_low(key, t)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.17g', MIN_COUNT * t.w))
  local over = redis.call('ZCARD', key) - t.size
  while over > 0 do
    local lowest = redis.call('ZRANGE', key, 0, 1)
    redis.call('ZREM', key, lowest[1] == t.last and lowest[2] or lowest[1])
    over = over - 1
  end
end

-- The first of `members` (lowest-ranked first) that is not one of this record's own patterns.
local function first_other(members, mine)
  for _, member in ipairs(members) do
    if not mine[member] then return member end
  end
  return nil
end

-- The pattern set eviction would drop, with its estimate: the least recently updated n-gram set (they
-- rank below every transition set: a transition is what every prediction starts from, an n-gram only
-- sharpens it), unless the least recently updated transition set has left the sketch altogether
-- (rated 0: not seen for 2 epochs). Without that exception a transition set nobody asks for any more
-- would hold its slot for as long as any n-gram set is registered. The batch's pending ticks are
-- written first, so the order is the one its earlier records left.
local function pattern_victim(rec, mine)
  flush_registry(patterns_key, pattern_ticks, pattern_order)
  local transition = first_other(redis.call('ZRANGE', patterns_key, 0, '+inf', 'BYSCORE', 'LIMIT', 0, rec.c + 1), mine)
  local seen = transition and estimate(transition)
  if seen == 0 then return transition, 0 end
  local ngram = first_other(redis.call('ZRANGE', patterns_key, '-inf', '(0', 'BYSCORE', 'LIMIT', 0, rec.c + 1), mine)
  if ngram then return ngram, estimate(ngram) end
  return transition, seen
end

-- TinyLFU's admission: a new item (estimated `freq`) takes the victim's place only if it is seen more
-- often; a tie keeps the victim, as an item seen as often as the one it would replace brings nothing
-- better (and a stream of one-offs would otherwise churn the set).
local function beats(freq, victim, victim_freq)
  return victim ~= nil and freq > victim_freq
end

local replies, unevict, applied = {}, {}, 0
local predicted_total, predicted_correct, patterns_rejected, queries_rejected = 0, 0, 0, 0
for i, rec in ipairs(records) do
  local tick, query = first_tick + i - 1, rec.query
  local s = session(rec)
  if not history_equals(s.stored, rec.first_history, rec.h) then
    replies[i] = {0, s.stored}
  else
    -- The verdict on the prediction pending for this session (see the header).
    local verdict = -1
    if s.pred and (s.pred ~= query or s.pred == s.stored[1]) then
      verdict = redis.call('HEXISTS', rec.pred, 'q:' .. query)
      redis.call('DEL', rec.pred)
      s.pred = false
      predicted_total = predicted_total + 1
      if verdict == 1 then predicted_correct = predicted_correct + 1 end
    end

    local mine = {}
    for j = rec.first_context, rec.first_context + rec.c - 1 do mine[string.sub(KEYS[j], #P + 1)] = true end
    for j = rec.first_context, rec.first_context + rec.c - 1 do
      local name = string.sub(KEYS[j], #P + 1)
      local freq = count(name)
      local known = registered[name]
      if not known and pattern_count >= max_patterns then
        local victim, victim_freq = pattern_victim(rec, mine)
        if beats(freq, victim, victim_freq) then
          -- Dropped from the registry now; its key is deleted by the next call of any worker (below).
          redis.call('ZREM', patterns_key, victim)
          redis.call('ZADD', evicted_key, tick, victim)
          registered[victim] = false
          known = true
        end
      elseif not known then
        pattern_count = pattern_count + 1
        known = true
      end
      if known then
        registered[name] = true
        observe(KEYS[j], decay, max_successors, query)
        note(pattern_ticks, pattern_order, name, j == rec.first_context and tick or tick - NGRAM_RANK)
        unevict[#unevict + 1] = name         -- evicted earlier, in use again: keep its key
      else
        patterns_rejected = patterns_rejected + 1
      end
    end
    observe(rec.hour, hour_decay, hour_size, query)

    -- Tools of at most max_queries queries: the most recently recorded, among those admitted.
    local qfreq = count('q:' .. query)
    local listed = listed_queries[query]
    if not listed and query_count >= max_queries then
      flush_registry(queries_key, query_ticks, query_order)
      local victim = redis.call('ZRANGE', queries_key, 0, 0)[1]   -- the least recently recorded
      if beats(qfreq, victim, victim and estimate('q:' .. victim)) then
        redis.call('ZREM', queries_key, victim)
        redis.call('HDEL', tools_key, victim)
        tools_of[victim] = nil
        listed_queries[victim] = false
        listed = true
      end
    elseif not listed then
      query_count = query_count + 1
      listed = true
    end
    if listed then
      listed_queries[query] = true
      note(query_ticks, query_order, query, tick)
      if rec.tools ~= '' then tools_of[query] = rec.tools end
    else
      queries_rejected = queries_rejected + 1
    end

    -- The session's history, newest first (pushed at the end, in order).
    local stored = {query}
    for j = 1, math.min(#s.stored, keep - 1) do stored[j + 1] = s.stored[j] end
    s.stored = stored
    s.pushed[#s.pushed + 1] = query
    applied = applied + 1
    replies[i] = {1, verdict}
  end
end

-- The batch's gathered writes.
write_counts()
for _, key in ipairs(touched_order) do
  local t = touched[key]
  if t.trim then drop_low(key, t) end
  redis.call('PEXPIRE', key, pattern_ttl)
end
do
  local fields = {}
  for name in pairs(obs_changed) do fields[#fields + 1] = name; fields[#fields + 1] = observations[name] end
  if #fields > 0 then redis.call('HSET', obs_key, unpack(fields)) end
end
flush_registry(patterns_key, pattern_ticks, pattern_order)
do
  local back = {}
  for _, name in ipairs(unevict) do
    if registered[name] then back[#back + 1] = name end   -- (not if a later record evicted it again)
  end
  if #back > 0 then redis.call('ZREM', evicted_key, unpack(back)) end
end
flush_registry(queries_key, query_ticks, query_order)
do
  local fields = {}
  for query, tools in pairs(tools_of) do fields[#fields + 1] = query; fields[#fields + 1] = tools end
  if #fields > 0 then redis.call('HSET', tools_key, unpack(fields)) end
end
for hist_key, s in pairs(sessions) do
  if #s.pushed > 0 then
    redis.call('LPUSH', hist_key, unpack(s.pushed))
    redis.call('LTRIM', hist_key, 0, keep - 1)
    redis.call('PEXPIRE', hist_key, session_ttl)
  end
end
local over = query_count - max_queries
if over > 0 then                       -- max_queries was lowered: the least recently recorded go
  for _, q in ipairs(redis.call('ZRANGE', queries_key, 0, over - 1)) do redis.call('HDEL', tools_key, q) end
  redis.call('ZREMRANGEBYRANK', queries_key, 0, over - 1)
end

-- More than max_patterns pattern sets only when max_patterns was lowered: the least recently updated
-- are dropped from the registry now (so they no longer count) and noted in `evicted`. Evicted keys
-- are deleted by the next call of any worker (a script may only touch keys its caller declares),
-- else expire after the pattern ttl.
over = pattern_count - max_patterns
if over > 0 then
  for _, name in ipairs(redis.call('ZRANGE', patterns_key, 0, over - 1)) do
    redis.call('ZADD', evicted_key, last_tick, name)
  end
  redis.call('ZREMRANGEBYRANK', patterns_key, 0, over - 1)
end
for j = first_doomed, first_doomed + D - 1 do
  local name = string.sub(KEYS[j], #P + 1)
  if not redis.call('ZSCORE', patterns_key, name) then
    redis.call('DEL', KEYS[j])
    redis.call('HDEL', obs_key, name)
  end
  redis.call('ZREM', evicted_key, name)
end

local counters = {'records', applied, 'predictions_total', predicted_total, 'predictions_correct', predicted_correct,
                  'patterns_rejected', patterns_rejected, 'queries_rejected', queries_rejected}
for j = 1, #counters, 2 do
  if counters[j + 1] > 0 then redis.call('HINCRBY', stats_key, counters[j], counters[j + 1]) end
end
return {replies, redis.call('ZRANGE', evicted_key, 0, 63)}
