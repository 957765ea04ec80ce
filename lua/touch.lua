#!lua
--[[
  touch.lua: apply one process's deferred bookkeeping of one shard in one call. A Redis hit is a plain
  read of the entry (no script); the reading process buffers what the hit leaves to do and sends it
  here in a batch, by size or age (see bookkeeping.py): the LRU stamps, the fleet hit counts,
  promotions L3 -> L2, moving an entry's Redis expiry with its idle deadline, the first hit of a
  prewarmed entry, the sizing evidence of misses, the removal of entries a reader found corrupt, and
  the fleet counters. Then it sweeps due work and enforces the bounds, as every write does. So LRU
  order, hit counts and promotion lag the reads by one batch window.

  A hit costs this script little: the reader says which tier it found the entry in, so the stamps of
  each tier go out as one ZADD XX (an entry that left the tier since is skipped); an entry's count is
  raised only while it still matters (below promote_after: what promotion and L1 copies look at), and
  its Redis expiry moved only when the reader saw it a whole idle step behind (see idle_step()).

  KEYS[1]       the shard's l2 key; the shard's other keys derive from it (see includes/shard.lua)
  ARGV[1..7]    the common header (now ms, capacities, idle ttls ms, promote_after, memory ms)
  ARGV[8]       the process's counts since its last batch, six non-negative integers, then whether to
                gather sizing evidence (1 with adaptive_redis, else 0) and whether to check the shard's
                key types and the ACL permissions first (1, else 0), separated by spaces:
                "<l1_hits> <l1_evictions> <l1_fills> <l2_hits> <l3_hits> <misses> <evidence> <checks>"
  ARGV[9..]     triples (kind, id, number), each id at most once per kind (and in one of 2, 3, 2n and 3n,
                and not in an n item if in a 2n or 3n one):
                  '2', id, hits   Redis hits on an entry the reader found in L2: stamped now
                  '3', id, hits   the same in L3; with evidence, a hit on one of L3's `step` least
                                  recently used entries counts tail_hits
                  '2n', id, hits  a '2' item whose hits all count: the same as '2' and 'n' with that
                  '3n', id, hits  number (a first hit's usual case: half the arguments); '3n' likewise
                  'n', id, hits   hits to add to the entry's fleet count `n`, with its '2' or '3' (if
                                  the tier still holds it); an L3 entry whose count reaches
                                  promote_after moves to L2
                  'e', id, tier   the reader found the entry's expiry an idle step behind its touch:
                                  its Redis expiry becomes its deadline from this call's stamp
                  'w', id, 0      a hit found the prewarmed mark w: the first such report clears it
                                  and counts prewarm_useful (once per prewarmed value, fleet-wide)
                  'm', id, misses misses on the id (>= 1): with evidence, one on an id L3 evicted
                                  lately counts ghost_hits; an index member whose data Redis dropped
                                  is removed
                  'c', id, ver    the reader found the entry corrupt (a payload that does not decode,
                                  fields written by hand, a key of another type) with this `ver`
                                  field ('' = none): it is removed unless it changed since

  Checks. Every other shard script checks the types of the shard's keys and the caller's ACL permissions
  before its first write, on every call. Bookkeeping batches come all the time, and those checks would
  be most of their cost, so the caller asks for them (<checks> = 1) only on its first batch of a shard,
  once a second, and after a batch failed; with them, nothing is written if anything is wrong. Between
  checks, a key overwritten by hand or a permission revoked would stop a batch midway: what it wrote
  is bookkeeping (stamps, counts, removals of dead entries), never a value, and a batch stopped halfway
  leaves no state the scripts do not already repair (an entry without its index record is indexed
  again by its next hit; byte totals are recounted); the next checked batch then refuses, naming why.

  A hit on data no index holds is an entry whose index member Redis evicted (allkeys-* policies): it is
  indexed again, unless the shard was flushed since it was written, in which case it is removed and
  announced, so no process keeps serving it.

  Reply: {promotions, demotions, evictions, expirations, now_ms}
]]
-- @include "includes/shard.lua"

local checks = string.sub(ARGV[HEAD + 1] or '', -2) ~= ' 0'  -- the counts' last number (see ARGV[8])
local err = check_head(not checks)
if err then return redis.error_reply(err) end
check_totals = false                     -- see the sweep at the end
local counts = {}
for c in string.gmatch(ARGV[HEAD + 1] or '', '%S+') do
  -- Plain decimal digits, at most 2^53: each is added to a counter Redis must read back as an integer.
  local v = string.len(c) <= 16 and string.match(c, '^%d+$') and tonumber(c)
  if not v or v > MAX_INT then counts = {}; break end
  counts[#counts + 1] = v
end
if #counts ~= 8 or counts[7] > 1 or counts[8] > 1 then
  return redis.error_reply('VRC_BADARG touch needs six counts (whole numbers from 0 to 2^53), the evidence '
      .. 'flag and the checks flag (0 or 1)')
end
local evidence = counts[7] == 1
if (#ARGV - HEAD - 1) % 3 ~= 0 then
  return redis.error_reply('VRC_BADARG touch needs the counts, then triples (kind, id, number)')
end

local stamped = {{}, {}}                 -- per tier (index 1 = L2, 2 = L3): ids, then their hits
local stamped_hits = {{}, {}}
local counted, expiring, prewarmed, missed, corrupt = {}, {}, {}, {}, {}  -- counted: id -> hits
-- Per kind: its number's least and most value, and what to do with an item. The kinds of hits first (most
-- items are): the tier they stamp (index into `stamped`), and whether their hits count too.
local STAMPS = {['2'] = 1, ['3'] = 2, ['2n'] = 1, ['3n'] = 2}
local COUNTS_TOO = {['2n'] = true, ['3n'] = true}
local RANGES = {['2'] = {1, MAX_INT}, ['3'] = {1, MAX_INT}, ['2n'] = {1, MAX_INT}, ['3n'] = {1, MAX_INT},
                n = {1, MAX_INT}, e = {2, 3}, w = {0, 0}, m = {1, MAX_INT}}
for i = HEAD + 2, #ARGV, 3 do
  local kind, id, s = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if id == '' then return redis.error_reply('VRC_BADARG touch: empty entry id') end
  if kind == 'c' then
    corrupt[#corrupt + 1] = {id, s}
  else
    local range = RANGES[kind]
    if not range then return redis.error_reply('VRC_BADARG touch: kind must be 2, 3, 2n, 3n, n, e, w, m or c') end
    -- A whole number in range (tonumber is enough: the value is only ever a count or a tier).
    local v = tonumber(s)
    if not v or v ~= math.floor(v) or v < range[1] or v > range[2] then
      return redis.error_reply('VRC_BADARG touch: a ' .. kind .. ' item needs a whole number from ' .. range[1]
          .. ' to ' .. range[2])
    end
    local t = STAMPS[kind]
    if t then
      local ids = stamped[t]
      ids[#ids + 1] = id
      stamped_hits[t][#ids] = v
      if COUNTS_TOO[kind] then counted[id] = v end
    elseif kind == 'n' then counted[id] = v
    elseif kind == 'e' then expiring[#expiring + 1] = id
    elseif kind == 'w' then prewarmed[#prewarmed + 1] = id
    else missed[#missed + 1] = id end
  end
end
if #stamped[1] + #stamped[2] > 1000 then return redis.error_reply('VRC_BADARG touch: at most 1000 hits per call') end

local useful, ghost_hits, tail_hits = 0, 0, 0
local SWEEP_MS = 1000

-- Data no index holds: Redis evicted the index member (or the whole index). Adopt it, unless a flush
-- came after it was written (then it is removed, and announced: some process may have served it).
local flushed_ver = nil
local function adopt(id)
  local ek = entry_key(id)
  local f = read_fields(ek, 'v', 'ver', 't', 'x', 'z')
  if not (f and f[1]) then return end                -- gone altogether: nothing to adopt
  if flushed_ver == nil then flushed_ver = tonumber(redis.call('HGET', stats_key, 'flushed_ver')) or 0 end
  local ver = tonumber(f[2])
  if not ver or ver <= flushed_ver or redis.call('ZSCORE', fence_key, id) then
    drop(id, nil, 'corrupt')
    announce(id, next_version())
    return
  end
  local tier = f[3] == '3' and 3 or 2
  local score = stamp(tier == 2 and l2_key or l3_key)
  local expiry = tonumber(f[5]) or tonumber(f[4])    -- when it is removed: z (fail-safe), else x
  redis.call('ZADD', tier == 2 and l2_key or l3_key, score, id)
  if expiry then redis.call('ZADD', exp_key, expiry, id) end
  redis.call('HSET', size_key, id, string.len(f[1]))
  set_deadline(ek, deadline(tier, score, expiry), tier, score, true)
  drifted = true  -- its bytes may still be counted, or not: the call ends with a recount
end

-- Stamps: one ZADD XX per tier. Fewer members changed than sent means some entry left the tier since
-- it was read (moved, removed, or its index member evicted by Redis): find which (rare). Then the counts,
-- up to where they matter (the reader knows: it saw the count), of the entries still in the tier (a
-- count is only added to an entry its index holds: no count is left behind without its entry); an L3
-- entry whose count reaches promote_after moves to L2.
local step = evidence and sizing_step() or 0
for t, key in ipairs({l2_key, l3_key}) do
  local ids, hits = stamped[t], stamped_hits[t]
  if #ids > 0 then
    if t == 2 and evidence then
      -- One of the `step` least recently used entries a smaller L3 would have lost? Ranked as the hits
      -- happened: an entry hit earlier in the batch has left the bottom by the time of a later hit.
      local scores, earlier = redis.call('ZMSCORE', key, unpack(ids)), {}
      for j, s in ipairs(scores) do
        if s then
          s = tonumber(s)
          local rank = redis.call('ZCOUNT', key, '-inf', string.format('(%.17g', s))
          for _, e in ipairs(earlier) do if e < s then rank = rank - 1 end end
          if rank < step then tail_hits = tail_hits + hits[j] end
          earlier[#earlier + 1] = s
        end
      end
    end
    local args = {}
    -- stamp() for each, inline (a batch has hundreds): the same strictly increasing scores, 0.001 ms apart.
    local first = stamp(key)
    for j, id in ipairs(ids) do args[2 * j - 1], args[2 * j] = first + (j - 1) * 0.001, id end
    newest[key] = args[2 * #ids - 1]
    local present = nil                  -- nil: every id is in the tier
    if redis.call('ZADD', key, 'XX', 'CH', unpack(args)) < #ids then
      present = redis.call('ZMSCORE', key, unpack(ids))
      for j, id in ipairs(ids) do
        if not present[j] and not tier_of(id) then adopt(id) end
      end
    end
    for j, id in ipairs(ids) do
      local k = counted[id]
      if k and (present == nil or present[j]) then
        local ek = entry_key(id)
        local n = add_hits(ek, k)
        if n >= promote_after and t == 2 then
          promote(id, ek, tonumber(redis.call('ZSCORE', exp_key, id)))
        end
      end
    end
  end
end

-- Expiries the readers saw an idle step behind: the entry's deadline from its (new) stamp.
for _, id in ipairs(expiring) do
  local tier, touched = tier_of(id)
  if tier then
    local expiry = tonumber(redis.call('ZSCORE', exp_key, id))
    if expiry and now >= expiry then
      drop(id, tier, 'expired', expiry)
    elseif not set_deadline(entry_key(id), deadline(tier, touched, expiry), tier, touched) then
      drop(id, tier, 'vanished', expiry)               -- Redis dropped its data (evicted, or by hand)
    end
  end
end

for _, id in ipairs(prewarmed) do
  if redis.pcall('HDEL', entry_key(id), 'w') == 1 then useful = useful + 1 end
end

for _, id in ipairs(missed) do
  if evidence and redis.call('ZREM', ghost_key, id) == 1 then ghost_hits = ghost_hits + 1 end
  local tier = tier_of(id)
  if tier and redis.pcall('HEXISTS', entry_key(id), 'v') ~= 1 then  -- its data is gone: so is the entry
    drop(id, tier, 'vanished', tonumber(redis.call('ZSCORE', exp_key, id)))
  end
end

for _, c in ipairs(corrupt) do
  local id, seen = c[1], c[2]
  local f = read_fields(entry_key(id), 'ver')
  if f == nil or (f[1] or '') == seen then drop(id, (tier_of(id)), 'corrupt') end
end

-- Reads come in batches all the time: a batch sweeps (and checks the byte totals) at most once per
-- SWEEP_MS window of the shard. It enforces the bounds every time (a promotion, or capacities the fleet
-- sizing just lowered).
if tonumber(redis.call('HGET', stats_key, 'sweep_window')) ~= math.floor(now / SWEEP_MS) then
  redis.call('HSET', stats_key, 'sweep_window', math.floor(now / SWEEP_MS))
  sweep()
  check_totals = true
end
enforce_bounds()
return finish({l1_hits = counts[1], l1_evictions = counts[2], l1_fills = counts[3],
               l2_hits = counts[4], l3_hits = counts[5], misses = counts[6],
               ghost_hits = ghost_hits, tail_hits = tail_hits, prewarm_useful = useful})
