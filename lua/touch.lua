#!lua
--[[
  touch.lua: apply one process's deferred bookkeeping of one shard in one call. A Redis hit is a plain
  read of the entry (no script); the reading process buffers it and sends a batch of them here, by
  size or age (see bookkeeping.py): the LRU stamps, the fleet hit counts, promotions L3 -> L2, the
  new idle deadlines, the first hit of a prewarmed entry, the sizing evidence of misses, the removal
  of entries a reader found corrupt, and the fleet counters. Then it sweeps due work and enforces the
  bounds, as every write does. So LRU order, hit counts and promotion lag reads by one batch window.

  KEYS[1]       the shard's l2 key; the shard's other keys derive from it (see includes/shard.lua)
  ARGV[1..7]    the common header (now ms, capacities, idle ttls ms, promote_after, memory ms)
  ARGV[8]       the process's counts since its last batch, six non-negative integers separated by
                spaces: "<l1_hits> <l1_evictions> <l1_fills> <l2_hits> <l3_hits> <misses>"
  ARGV[9..]     triples, one per entry id (each id at most once per kind):
                  'h', id, hits    Redis hits on the entry (>= 1): its touch is stamped now, its count
                                   `n` grows by hits; in L3, reaching promote_after moves it to L2;
                                   one of L3's least recently used `step` entries counts tail_hits
                  'w', id, 0       a hit found the prewarmed mark w: the first such report clears it
                                   and counts prewarm_useful (once per prewarmed value, fleet-wide)
                  'm', id, misses  misses on the id (>= 1): one on an id L3 evicted lately counts
                                   ghost_hits; an index member whose data Redis dropped is removed
                  'c', id, ver     the reader found the entry corrupt (a payload that does not
                                   decode, fields written by hand, a key of another type) with this
                                   `ver` field ('' = none): it is removed unless it changed since

  An id a hit reports but no index holds is an entry whose index member Redis evicted (allkeys-*
  policies): it is indexed again, unless the shard was flushed since it was written, in which case
  it is removed and announced, so no process keeps serving it.

  Reply: {promotions, demotions, evictions, expirations, now_ms}
]]
-- @include "includes/shard.lua"

local err = check_head()
if err then return redis.error_reply(err) end
local counts = {}
for c in string.gmatch(ARGV[HEAD + 1] or '', '%S+') do counts[#counts + 1] = c end
if #counts ~= 6 or not plain_ints(counts[1], counts[2], counts[3], counts[4]) or not plain_ints(counts[5], counts[6])
    or (#ARGV - HEAD - 1) % 3 ~= 0 then
  return redis.error_reply('VRC_BADARG touch needs six counts, then triples of (kind, id, number)')
end
local hits, prewarmed, missed, corrupt = {}, {}, {}, {}
for i = HEAD + 2, #ARGV, 3 do
  local kind, id, n = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if string.len(id) == 0 then return redis.error_reply('VRC_BADARG touch: empty entry id') end
  if kind == 'c' then
    corrupt[#corrupt + 1] = {id, n}
  else
    local v = arg_int(i + 2, kind == 'w' and 0 or 1)
    if not v then return redis.error_reply('VRC_BADARG touch: ' .. kind .. ' needs a count >= 1') end
    if kind == 'h' then hits[#hits + 1] = {id, v}
    elseif kind == 'w' then prewarmed[#prewarmed + 1] = id
    elseif kind == 'm' then missed[#missed + 1] = {id, v}
    else return redis.error_reply('VRC_BADARG touch: kind must be h, w, m or c') end
  end
end
if #hits > 1000 then return redis.error_reply('VRC_BADARG touch: at most 1000 hits per call') end

local useful, ghost_hits, tail_hits = 0, 0, 0
local flushed_ver = nil

-- Hits: one ZMSCORE per index finds where each entry is and its absolute expiry; the new stamps of
-- each tier go out in one ZADD. Per entry: its new deadline (which also tells whether its data is
-- still there) and its count.
local s2, s3, sx = {}, {}, {}
if #hits > 0 then
  local ids = {}
  for j, h in ipairs(hits) do ids[j] = h[1] end
  s2 = redis.call('ZMSCORE', l2_key, unpack(ids))
  s3 = redis.call('ZMSCORE', l3_key, unpack(ids))
  sx = redis.call('ZMSCORE', exp_key, unpack(ids))
end
local step = sizing_step()
local z2, z3 = {}, {}
for j, h in ipairs(hits) do
  local id, k = h[1], h[2]
  local ek = entry_key(id)
  local expiry = tonumber(sx[j])
  local tier = (s2[j] and 2) or (s3[j] and 3) or nil
  if tier and expiry and now >= expiry then
    drop(id, tier, 'expired', expiry)                  -- read just before its end: gone now
  elseif tier == 2 then
    local score = stamp(l2_key)
    if touch_deadline(ek, deadline(2, score, expiry)) then
      z2[#z2 + 1], z2[#z2 + 2] = score, id
      add_hits(ek, k)
    else
      drop(id, 2, 'vanished', expiry)                  -- Redis dropped its data (evicted, or by hand)
    end
  elseif tier == 3 then
    if redis.call('EXISTS', ek) == 0 then
      drop(id, 3, 'vanished', expiry)
    else
      if redis.call('ZCOUNT', l3_key, '-inf', string.format('(%.17g', tonumber(s3[j]))) < step then
        tail_hits = tail_hits + k                      -- one of the LRU entries a smaller L3 would have lost
      end
      if add_hits(ek, k) >= promote_after then
        promote(id, ek, expiry)
      else
        local score = stamp(l3_key)
        z3[#z3 + 1], z3[#z3 + 2] = score, id
        set_deadline(ek, deadline(3, score, expiry))
      end
    end
  else
    -- Data no index holds: Redis evicted the index itself. Adopt it, unless a flush came after it was
    -- written.
    local f = read_fields(ek, 'ver', 't', 'x')
    if f and f[1] then
      if flushed_ver == nil then flushed_ver = tonumber(redis.call('HGET', stats_key, 'flushed_ver')) or 0 end
      local ver = tonumber(f[1])
      if not ver or ver <= flushed_ver or redis.call('ZSCORE', fence_key, id) then
        drop(id, nil, 'corrupt')
        announce(id, next_version())
      else
        local into = f[2] == '3' and 3 or 2
        local key = into == 2 and l2_key or l3_key
        local score = stamp(key)
        expiry = tonumber(f[3])
        redis.call('ZADD', key, score, id)
        if expiry then redis.call('ZADD', exp_key, expiry, id) end
        -- Its bytes may still be counted (its size record survived) or not: the call ends with a recount.
        redis.call('HSET', size_key, id, redis.call('HSTRLEN', ek, 'v'))
        drifted = true
        set_deadline(ek, deadline(into, score, expiry))
      end
    end
  end
end
if #z2 > 0 then redis.call('ZADD', l2_key, 'XX', unpack(z2)) end
if #z3 > 0 then redis.call('ZADD', l3_key, 'XX', unpack(z3)) end

for _, id in ipairs(prewarmed) do
  if redis.pcall('HDEL', entry_key(id), 'w') == 1 then useful = useful + 1 end
end

for _, m in ipairs(missed) do
  local id = m[1]
  if redis.call('ZREM', ghost_key, id) == 1 then ghost_hits = ghost_hits + 1 end
  local tier = tier_of(id)
  if tier and redis.call('EXISTS', entry_key(id)) == 0 then
    drop(id, tier, 'vanished', tonumber(redis.call('ZSCORE', exp_key, id)))
  end
end

for _, c in ipairs(corrupt) do
  local id, seen = c[1], c[2]
  local ek = entry_key(id)
  local f = read_fields(ek, 'ver')
  if f == nil or (f[1] or '') == seen then drop(id, (tier_of(id)), 'corrupt') end
end

sweep()
enforce_bounds()
return finish({l1_hits = tonumber(counts[1]), l1_evictions = tonumber(counts[2]), l1_fills = tonumber(counts[3]),
               l2_hits = tonumber(counts[4]), l3_hits = tonumber(counts[5]), misses = tonumber(counts[6]),
               ghost_hits = ghost_hits, tail_hits = tail_hits, prewarm_useful = useful})
