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
  KEYS[9 .. 8+c]              the context patterns the caller derived from the history it expects:
                              P next:<previous query>, then P ngram:<...> for n = 3, 4, ... (c of them)
  KEYS[9+c ..]                evicted patterns to delete now (names an earlier call returned, at most
                              64): each is deleted only if it has not been registered again since

  ARGV[1]   query (non-empty bytes)
  ARGV[2]   tools, a JSON list ('' = keep what is stored)
  ARGV[3]   session ttl, ms (>= 1): history and pending prediction expire this long after last use
  ARGV[4]   history kept, queries (= ngram_size - 1, >= 1)
  ARGV[5]   max_patterns (>= 1): pattern sets kept, least recently updated dropped first
  ARGV[6]   max_successors (>= 1): members kept per pattern set
  ARGV[7]   decay per observation of a pattern (0 < decay <= 1)
  ARGV[8]   decay per observation of an hour set (0 < decay <= 1)
  ARGV[9]   members kept per hour set (>= 1)
  ARGV[10]  queries whose tools are kept (>= 1), the most recently recorded
  ARGV[11]  pattern ttl, ms (>= 1): a pattern set not updated this long expires (a safety net)
  ARGV[12]  c, the number of context keys (0 .. 64)
  ARGV[13]  h, the number of history entries the caller expects (0 .. ARGV[4])
  ARGV[14 .. 13+h]  that history, newest first

  The pending prediction of the session is judged by this query, unless it was made after this very
  query before it was recorded (predict, then record the current query): then it waits for the next.

  Reply: {0, {stored history}}          the history differs from the expected one: nothing written;
                                        the caller derives the context keys again and retries
         {1, verdict, {pending names}}  recorded. verdict: -1 = nothing judged, 0 = the query was not
                                        predicted, 1 = it was. Pending names (at most 64, key names
                                        without P) are evicted patterns whose keys the caller deletes
                                        with its next call (as KEYS[9+c..]); they also expire after
                                        the pattern ttl.
]]
-- @include "includes/model.lua"

local stats_key, patterns_key, queries_key, tools_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local evicted_key, hist_key, pred_key, hour_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local query, tools = ARGV[1], ARGV[2]
local session_ttl, keep = arg_int(3, 1, 1e15), arg_int(4, 1, 64)
local max_patterns, max_successors = arg_int(5, 1, 1e9), arg_int(6, 1, 1e6)
local decay, hour_decay = arg_number(7, 1e-9, 1), arg_number(8, 1e-9, 1)
local hour_size, max_queries, pattern_ttl = arg_int(9, 1, 1e9), arg_int(10, 1, 1e9), arg_int(11, 1, 1e15)
local c, h = arg_int(12, 0, 64), arg_int(13, 0, 64)

if string.len(query) == 0 or not (session_ttl and keep and max_patterns and max_successors and decay
    and hour_decay and hour_size and max_queries and pattern_ttl and c and h) or h > keep or #KEYS < 8 + c or #KEYS > 8 + c + 64
    or #ARGV ~= 13 + h then
  return redis.error_reply('VRC_BADARG record: empty query, or a count, ttl or decay out of range, or '
      .. 'KEYS/ARGV lengths that do not match c and h')
end
local wrong = preflight({'hash', 'zset', 'zset', 'hash', 'zset', 'list', 'hash', 'zset'})
if wrong then return redis.error_reply(wrong) end

local same, stored = history_matches(hist_key, keep, 14, h)
if not same then return {0, stored} end

local tick = redis.call('HINCRBY', stats_key, 'tick', 1)
local NGRAM_RANK = 1e15               -- subtracted from an n-gram set's tick in `patterns` (see below)

-- The verdict on the prediction pending for this session (see the header).
local verdict = -1
local made_after = redis.call('HGET', pred_key, 'for')
if made_after and (made_after ~= query or made_after == stored[1]) then
  verdict = redis.call('HEXISTS', pred_key, 'q:' .. query)
  redis.call('DEL', pred_key)
  redis.call('HINCRBY', stats_key, 'predictions_total', 1)
  if verdict == 1 then redis.call('HINCRBY', stats_key, 'predictions_correct', 1) end
end

-- One observation of `member` in a decayed, bounded set; the member just seen always stays.
local function observe(key, d, size)
  if d < 1 then redis.call('ZUNIONSTORE', key, 1, key, 'WEIGHTS', d) end
  redis.call('ZINCRBY', key, 1, query)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. MIN_COUNT)
  local over = redis.call('ZCARD', key) - size
  while over > 0 do
    local lowest = redis.call('ZRANGE', key, 0, 1)
    redis.call('ZREM', key, lowest[1] == query and lowest[2] or lowest[1])
    over = over - 1
  end
end

for i = 9, 8 + c do
  local name = string.sub(KEYS[i], #P + 1)
  observe(KEYS[i], decay, max_successors)
  redis.call('PEXPIRE', KEYS[i], pattern_ttl)
  -- n-gram sets rank below every transition set, so eviction takes them first: a transition is
  -- what every prediction starts from, an n-gram only sharpens it.
  redis.call('ZADD', patterns_key, i == 9 and tick or tick - NGRAM_RANK, name)
  redis.call('ZREM', evicted_key, name)              -- evicted earlier, in use again: keep its key
end
observe(hour_key, hour_decay, hour_size)
redis.call('PEXPIRE', hour_key, pattern_ttl)

-- Tools of the queries recorded most recently (at most max_queries of them).
redis.call('ZADD', queries_key, tick, query)
if tools ~= '' then redis.call('HSET', tools_key, query, tools) end
local over = redis.call('ZCARD', queries_key) - max_queries
if over > 0 then
  for _, q in ipairs(redis.call('ZRANGE', queries_key, 0, over - 1)) do redis.call('HDEL', tools_key, q) end
  redis.call('ZREMRANGEBYRANK', queries_key, 0, over - 1)
end

-- The session's history, newest first.
redis.call('LPUSH', hist_key, query)
redis.call('LTRIM', hist_key, 0, keep - 1)
redis.call('PEXPIRE', hist_key, session_ttl)

-- At most max_patterns pattern sets: the least recently updated are dropped from the registry now
-- (so they no longer count) and noted in `evicted`; their keys are deleted by the next call of any
-- worker (a script may only touch keys its caller declares), else expire after the pattern ttl.
over = redis.call('ZCARD', patterns_key) - max_patterns
if over > 0 then
  for _, name in ipairs(redis.call('ZRANGE', patterns_key, 0, over - 1)) do
    redis.call('ZADD', evicted_key, tick, name)
  end
  redis.call('ZREMRANGEBYRANK', patterns_key, 0, over - 1)
end
for i = 9 + c, #KEYS do
  local name = string.sub(KEYS[i], #P + 1)
  if not redis.call('ZSCORE', patterns_key, name) then redis.call('DEL', KEYS[i]) end
  redis.call('ZREM', evicted_key, name)
end

redis.call('HINCRBY', stats_key, 'records', 1)
return {1, verdict, redis.call('ZRANGE', evicted_key, 0, 63)}
