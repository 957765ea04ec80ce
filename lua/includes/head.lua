--[[
  includes/head.lua: what every shard script needs on every call, and nothing more: the key names,
  the common header, and the helpers of a pure hit (get.lua's fast path). Included by
  includes/shard.lua, and by get.lua at its top.

  Redis runs a script's whole body on each call, so every helper defined here is a new closure per
  call: what only some calls need lives in includes/shard.lua, which get.lua includes inside the
  function of its full path, so a pure hit never builds it.
]]
local HEAD = 9

local l2_key, l3_key, exp_key, stats_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local gone_key, fence_key, ghost_key = KEYS[5], KEYS[6], KEYS[7]
local base = string.sub(l2_key, 1, -3)

-- The common ARGV as numbers, and `now` from the server's TIME when ARGV[1] is 0. Only plain
-- decimal digits are accepted (no sign, exponent, hex, spaces, inf or nan, all of which tonumber
-- takes; one pattern match checks all nine), at most 2^53, so each number is exact in Lua and Redis
-- reads it back unchanged when the script writes it. Returns an error message or nil; reads nothing
-- but TIME and writes nothing.
local HEAD_PATTERN = '^%d+ %d+ %d+ %d+ %d+ %d+ %d+ %d+ %d+$'  -- HEAD of them (a literal: no work per call)
local BAD_HEAD = 'VRC_BADARG common ARGV must be non-negative integers (now, caps >= 1, ttls, promote_after >= 1, deltas, memory >= 1)'
local now, cap2, cap3, idle2, idle3, promote_after, l1_hits, l1_evictions, memory
local function parse_head()
  if #ARGV < HEAD or not string.find(table.concat(ARGV, ' ', 1, HEAD), HEAD_PATTERN) then return BAD_HEAD end
  now, cap2, cap3 = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
  idle2, idle3, promote_after = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  l1_hits, l1_evictions, memory = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  if cap2 < 1 or cap3 < 1 or promote_after < 1 or memory < 1
      or math.max(now, cap2, cap3, idle2, idle3, promote_after, l1_hits, l1_evictions, memory) > 9007199254740992 then
    return BAD_HEAD
  end
  if now == 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return nil
end

-- Sizing evidence (adaptive.py): the number of L3 evictions remembered as ghosts, which is also
-- the number of least recently used L3 entries whose hits count as tail hits.
local function sizing_step() return math.max(1, math.floor(cap3 / 10 + 0.5)) end

local function entry_key(id) return base .. 'e:' .. id end

-- Are these five fields integers (or absent)? Fields written by hand may hold anything; HINCRBY and
-- the replies need integers. (One pattern match for all five.)
local function plain_ints(a, b, c, d, e)
  return string.find((a or '0') .. ' ' .. (b or '0') .. ' ' .. (c or '0') .. ' ' .. (d or '0') .. ' ' .. (e or '0'),
                     '^%-?%d+ %-?%d+ %-?%d+ %-?%d+ %-?%d+$') ~= nil
end

-- Adds d to a counter of the stats hash. A counter written by hand that is no integer is reset to d
-- (HINCRBY would fail the call midway, keeping its earlier writes). Returns an error only when the
-- stats key is not a hash (the callers check its type before their first write, or take this as one).
local function count(field, d)
  local done = redis.pcall('HINCRBY', stats_key, field, d)
  if type(done) == 'table' and done.err then
    if string.find(done.err, 'WRONGTYPE', 1, true) then return done.err end
    redis.call('HSET', stats_key, field, d)
  end
  return nil
end

-- Fields of an entry's data hash (HMGET), or nil when the key holds another type (written by hand).
local function read_fields(ek, ...)
  local fields = redis.pcall('HMGET', ek, ...)
  if type(fields) == 'table' and fields.err then return nil end
  return fields
end

-- Touch scores: the current time in ms, made strictly increasing within each tier's sorted set
-- (a touch scores above the newest one there, by 0.001 ms if they share a millisecond), so LRU order
-- within a shard is exact: ties would otherwise be broken by entry id.
local newest = {}                    -- tier key -> the newest score in it (read once per call)
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
