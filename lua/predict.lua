#!lua
--[[
  predict.lua: score the queries likely to come next in a session, and remember what was predicted
  so the session's next recorded query can be checked against it (record.lua).

    confidence(q) = w_t * P(q | current query) + w_n * P(q | the session's last n-1 queries)
                  + w_h * P(q | this UTC hour)

  each P being a pattern set's decayed count of q over the sum of its counts. For the n-gram part
  the longest context with any observation is used (n = ngram_size down to 3), else the transition
  itself (the 2-gram). With weights summing to 1, confidence is the model's estimate of the
  probability that q is the session's next query.

  KEYS[1]  P stats            HASH  (see includes/model.lua for every key)
  KEYS[2]  P tools            HASH
  KEYS[3]  P hist:<session>   LIST
  KEYS[4]  P pred:<session>   HASH  replaced when ARGV[2] = 1 (deleted when nothing is predicted)
  KEYS[5]  P hour:<HH>        ZSET
  KEYS[6]  P next:<current query>
  KEYS[7..]                   P ngram:<...> for n = 3, 4, ... (longest last), from the expected history

  ARGV[1]   top_k (1 .. 1000)
  ARGV[2]   1 = remember the prediction for the accuracy counters, 0 = do not
  ARGV[3]   session ttl, ms (>= 1)
  ARGV[4]   min_confidence (0 .. 1)
  ARGV[5..7]  the weights w_t, w_n, w_h (>= 0, summing to 1)
  ARGV[8]   the current query (non-empty)
  ARGV[9]   history kept, queries (= ngram_size - 1, 1 .. 64)
  ARGV[10]  h, the number of history entries the caller expects (0 .. ARGV[9])
  ARGV[11 .. 10+h]  that history, newest first

  Reply: {0, {stored history}}  the history differs from the expected one: nothing written, retry
         {1, {query, confidence, p_transition, p_ngram, p_hour, tools JSON or false}, ...}
                                best first; numbers as decimal strings (Lua would truncate them)
]]
-- @include "includes/model.lua"

local tools_key, hist_key, pred_key, hour_key = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local top_k, remember, session_ttl = arg_int(1, 1, 1000), arg_int(2, 0, 1), arg_int(3, 1, 1e15)
local min_confidence = arg_number(4, 0, 1)
local w_t, w_n, w_h = arg_number(5, 0, 1), arg_number(6, 0, 1), arg_number(7, 0, 1)
local current, keep, h = ARGV[8], arg_int(9, 1, 64), arg_int(10, 0, 64)

if not (top_k and remember and session_ttl and min_confidence and w_t and w_n and w_h and keep and h)
    or string.len(current or '') == 0 or h > keep or #KEYS < 6 or #ARGV ~= 10 + h then
  return redis.error_reply('VRC_BADARG predict: a count, ttl, weight or confidence out of range, or an '
      .. 'ARGV length that does not match h')
end
local wrong = preflight({'hash', 'hash', 'list', 'hash'})
if wrong then return redis.error_reply(wrong) end

local same, stored = history_matches(hist_key, keep, 11, h)
if not same then return {0, stored} end

local transition, t_total = distribution(KEYS[6])
local ngram, n_total = transition, t_total
for i = #KEYS, 7, -1 do                  -- the longest context the model has seen
  local d, total = distribution(KEYS[i])
  if total > 0 then ngram, n_total = d, total; break end
end
local hour, h_total = distribution(hour_key)

local function p(d, total, q)
  if total <= 0 then return 0 end
  return (d[q] or 0) / total
end

local scored, seen = {}, {}
for _, d in ipairs({transition, ngram, hour}) do
  for q in pairs(d) do
    if not seen[q] then
      seen[q] = true
      local pt, pn, ph = p(transition, t_total, q), p(ngram, n_total, q), p(hour, h_total, q)
      local conf = w_t * pt + w_n * pn + w_h * ph
      if conf >= min_confidence and conf > 0 then scored[#scored + 1] = {q, conf, pt, pn, ph} end
    end
  end
end
table.sort(scored, function(a, b)
  if a[2] ~= b[2] then return a[2] > b[2] end
  return a[1] < b[1]
end)

local out = {1}
local chosen = {}
for i = 1, math.min(top_k, #scored) do
  local s = scored[i]
  chosen[#chosen + 1] = s[1]
  local tools = redis.call('HGET', tools_key, s[1])
  out[#out + 1] = {s[1], string.format('%.17g', s[2]), string.format('%.17g', s[3]),
                   string.format('%.17g', s[4]), string.format('%.17g', s[5]), tools}
end

if remember == 1 then                    -- this prediction replaces any older one, even when empty
  redis.call('DEL', pred_key)
  if #chosen > 0 then
    redis.call('HSET', pred_key, 'for', current)
    for _, q in ipairs(chosen) do redis.call('HSET', pred_key, 'q:' .. q, 1) end
    redis.call('PEXPIRE', pred_key, session_ttl)
  end
end
return out
