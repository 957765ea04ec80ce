#!lua flags=no-writes
--[[
  view.lua: read pattern sets of the prediction model, and the tools of their members, for a
  process's local view of the model (victor_rcache/prediction/background.py). The process then
  scores predictions itself, with the formula predict.lua uses, without a round trip per question.
  Read only (flags=no-writes): it runs while Redis is out of memory, and on a replica.

  KEYS[1]      P tools   HASH  query -> JSON list of the tools its latest selection used
  KEYS[2 .. n] pattern sets (ZSET, absent is fine): P next:<q>, P ngram:<...>, P hour:<HH>; at most 512

  ARGV[1]  1 = also return the tools of every member read, 0 = not

  Reply: {sets, tools}
         sets[i]   the flat {member, count, member, count, ...} of KEYS[i + 1], lowest count first,
                   counts as Redis formats them (%.17g: they round-trip exactly)
         tools     {member, tools JSON or false, ...} for the distinct members of all sets ({} when
                   ARGV[1] = 0)
]]

local tools_key = KEYS[1]
local with_tools = ARGV[1]

if #KEYS < 1 or #KEYS > 513 or (with_tools ~= '0' and with_tools ~= '1') or #ARGV ~= 1 then
  return redis.error_reply('VRC_BADARG view: 1 to 513 keys (tools, then pattern sets) and ARGV[1] 0 or 1')
end
-- A key of the wrong type, named (no TYPE call per key first: this script writes nothing, so it may
-- find out on the way, and a round reads many sets).
local function wrong_type(i, want)
  local t = redis.call('TYPE', KEYS[i])['ok']
  return redis.error_reply('VRC_WRONGTYPE ' .. KEYS[i] .. ' is a ' .. t .. ', the prediction model needs a ' .. want)
end

local sets, members, seen = {}, {}, {}
for i = 2, #KEYS do
  local flat = redis.pcall('ZRANGE', KEYS[i], 0, -1, 'WITHSCORES')
  if flat.err then return wrong_type(i, 'zset') end
  sets[#sets + 1] = flat
  for j = 1, #flat, 2 do
    if not seen[flat[j]] then
      seen[flat[j]] = true
      members[#members + 1] = flat[j]
    end
  end
end

local tools = {}
if with_tools == '1' and #members > 0 then
  -- HMGET in slices: Lua's unpack() has a stack limit of about 8,000 values.
  for first = 1, #members, 1000 do
    local slice = {}
    for j = first, math.min(first + 999, #members) do slice[#slice + 1] = members[j] end
    local got = redis.pcall('HMGET', tools_key, unpack(slice))
    if got.err then return wrong_type(1, 'hash') end
    for j = 1, #slice do
      tools[#tools + 1] = slice[j]
      tools[#tools + 1] = got[j]
    end
  end
end
return {sets, tools}
