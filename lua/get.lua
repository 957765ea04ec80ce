#!lua
--[[
  get.lua: look up entries of one shard in L2 and L3 in one call, counting hits and moving tiers.

  KEYS[1..7]  the shard's l2, l3, exp, stats, gone, fence and ghost keys (see includes/shard.lua)
  ARGV[1..9]  the common header (now ms, capacities, idle ttls ms, promote_after, L1 deltas, memory ms)
  ARGV[10]    a fill lease to take on a miss, "<ttl_ms>:<token>" (get_or_set), or empty for none; only
              with a single id: the miss and the lease are one atomic step, so no fill can land
              between them (the lease key is <ns>:{<tag>}:lease:<id>, see release.lua)
  ARGV[11..]  entry ids to look up (one or more, all different)

  For each id, in order:
    * absent, data gone, past its absolute expiry, or idle past its tier's ttl -> a miss
      (the last two also remove or demote it, as the sweep would have);
    * a version, size, expiry, hit count or cost that is not an integer (written by hand) -> a
      miss, and the entry is removed;
    * in L2 -> an L2 hit; its score becomes now (a new stamp);
    * in L3 -> an L3 hit; when its hit count reaches promote_after it moves to L2 (promotion),
      otherwise its L3 score becomes now (a new stamp).
  Every hit increments the entry's fleet-wide hit count `n`. The first hit of a prewarmed entry
  (field w) counts `prewarm_useful` in the shard's stats and clears the mark.

  Two paths, one outcome. The fast path serves a call whose ids are all plain hits (in L2, or in
  L3 short of promotion; not expired, idle, corrupt or prewarmed) or plain misses (in no tier, no
  data left behind), once the shard has swept in the current SWEEP_MS window (the tier's newest
  touch is in it; L2's for a miss). It only reads first (the ids' scores, their fields, the tiers'
  newest touch, the `ghost` record of a miss), then writes: HINCRBY of the stats' counts, and per
  hit a ZADD of a new stamp and an HSET of the entry's count, per miss on a ghost a ZREM, all to
  keys it has read (the stats by that first HINCRBY, before any other write). Anything else takes
  the full path: it checks every shard key's type and every permission before its first write,
  sweeps due work (so the first call of a window sweeps), applies expiry, idleness and promotion,
  and enforces the bounds. The full path is a function, so the fast path never builds its helpers
  (Redis runs the whole body of a script on every call).

  Reply: { {promotions, demotions, evictions, expirations, now_ms},  -- caused by this call; its time
           {0, now_ms}                                         -- a miss, and when it was seen
           {0, now_ms, 1}                                      -- a miss: a corrupt entry was removed
           {0, now_ms, corrupt, taken, pttl_ms}                -- a miss, with a lease asked for: taken
                                                               -- = 1 if this call now holds it, and
                                                               -- the lease's PTTL (-1: no expiry)
           {tier, payload, fill_l1, ttl_left_ms, version, cost_ms},   -- a hit: tier 2 = L2, 3 = L3
           ... }                                               -- one reply per id, in order
    fill_l1 = 1 when the entry is still in L2 after this call and its count >= promote_after
    ttl_left_ms = ms until its absolute expiry, -1 when it has none
    cost_ms = how long the value took to compute (0 = unknown), for early refresh
]]
-- @include "includes/head.lua"

local SWEEP_MS = 1000  -- hits alone sweep a tier at most once per window this long (ms of the shard's clock)
local FAST_IDS = 1000  -- the most ids the fast path takes in one call (ZMSCORE gets them all at once)

-- Takes the fill lease a get_or_set asked for, if the call's one id missed: SET NX PX, and the
-- lease's PTTL, into the miss reply (see Reply). Its permissions are checked with the call's writes.
local function take_lease(results, id, token, lease_ms)
  local reply = results[2]
  if token and reply[1] == 0 then
    local key = base .. 'lease:' .. id
    local taken = redis.call('SET', key, token, 'NX', 'PX', lease_ms) and 1 or 0
    reply[3], reply[4], reply[5] = reply[3] or 0, taken, redis.call('PTTL', key)
  end
  return results
end

-- ------------------------------------------------------------------ the full path
local function full_path(ids, token, lease_ms)
  -- @include "includes/shard.lua"

  local err = parse_head() or check_all()
  if not err and token then err = check_commands({'set', 'pttl'}, base .. 'lease:' .. ids[1]) end  -- the lease key
  if err then return redis.error_reply(err) end

  sweep()

  local results, l2_hits, l3_hits, misses, useful, ghost_hits, tail_hits = {}, 0, 0, 0, 0, 0, 0
  for _, id in ipairs(ids) do
    local ek = entry_key(id)
    local s2 = redis.call('ZSCORE', l2_key, id)
    local s3 = nil
    if s2 then s2 = tonumber(s2) else s3 = tonumber(redis.call('ZSCORE', l3_key, id)) end
    local reply = {0, now}
    if s2 or s3 then
      local f = entry_fields(ek, 'v', 'ver', 'x', 's', 'd', 'w', 'n') or {}
      local expiry = tonumber(f[3])
      if not f[1] then                                   -- data gone (evicted by Redis, or by hand)
        redis.call('ZREM', s2 and l2_key or l3_key, id)
        redis.call('ZREM', exp_key, id)
      elseif not (f[2] and plain_ints(f[2], f[3], f[4], f[5], f[7])) then
        drop(id, s2 and 2 or 3, 'corrupt')               -- fields written by hand: not an entry any more
        reply = {0, now, 1}
      elseif expiry and now >= expiry then               -- absolute ttl passed
        drop(id, s2 and 2 or 3, 'expired', expiry)
      else
        if s2 and idle2 > 0 and now - s2 >= idle2 then   -- idle in L2: it belongs to L3 by now
          s3, s2 = s2 + idle2, nil
          into_l3(id, s3)
        end
        if s3 and idle3 > 0 and now - s3 >= idle3 then   -- idle in L3: it is gone
          drop(id, 3, 'idle', s3 + idle3)
        else
          local n = redis.call('HINCRBY', ek, 'n', 1)
          if f[6] then
            redis.call('HDEL', ek, 'w')
            useful = useful + 1
          end
          local tier, in_l2 = 2, true
          if s2 then
            redis.call('ZADD', l2_key, stamp(l2_key), id)
            l2_hits = l2_hits + 1
          else
            tier = 3
            l3_hits = l3_hits + 1
            if redis.call('ZCOUNT', l3_key, '-inf', string.format('(%.17g', s3)) < sizing_step() then
              tail_hits = tail_hits + 1
            end
            if n >= promote_after then
              local size = tonumber(f[4]) or 0
              redis.call('ZREM', l3_key, id)
              redis.call('ZADD', l2_key, stamp(l2_key), id)
              bytes3, bytes2 = bytes3 - size, bytes2 + size
              ev.promotions = ev.promotions + 1
            else
              redis.call('ZADD', l3_key, stamp(l3_key), id)
              in_l2 = false
            end
          end
          local fill = 0
          if in_l2 and n >= promote_after then fill = 1 end
          reply = {tier, f[1], fill, expiry and (expiry - now) or -1, tonumber(f[2]), tonumber(f[5]) or 0}
        end
      end
    else
      redis.call('DEL', ek)                              -- data without an index entry is never valid
    end
    if reply[1] == 0 then
      misses = misses + 1
      if redis.call('ZREM', ghost_key, id) == 1 then ghost_hits = ghost_hits + 1 end
    end
    results[#results + 1] = reply
  end

  enforce_bounds()
  -- A later promotion in this call may have pushed an entry back down: only what is still in L2 fills
  -- L1, and an entry that may now live in some L1 is marked (f = 1) so that its removal is remembered.
  local fills = 0
  for i, r in ipairs(results) do
    if r[1] ~= 0 and r[3] == 1 then
      local id = ids[i]
      if redis.call('ZSCORE', l2_key, id) then
        redis.call('HSET', entry_key(id), 'f', 1)
        fills = fills + 1
      else
        r[3] = 0
      end
    end
  end
  table.insert(results, 1, finish({l2_hits = l2_hits, l3_hits = l3_hits, misses = misses, l1_fills = fills,
                                   ghost_hits = ghost_hits, tail_hits = tail_hits,
                                   prewarm_useful = useful}))
  return take_lease(results, ids[1], token, lease_ms)
end

-- ------------------------------------------------------------------ the fast path
-- Every table and closure made here costs time on every call (and the garbage collector's time
-- later): the code below is written to make few.

local err = parse_head()
if err then return redis.error_reply(err) end
if #ARGV <= HEAD + 1 then
  return redis.error_reply('VRC_BADARG get needs a lease request (empty for none) and at least one entry id')
end
local lease_ms, token = nil, nil
if ARGV[HEAD + 1] ~= '' then
  local ms, tok = string.match(ARGV[HEAD + 1], '^(%d+):(.+)$')
  lease_ms = tonumber(ms)
  if not (lease_ms and lease_ms >= 1 and lease_ms <= 9007199254740992 and #ARGV == HEAD + 2) then
    return redis.error_reply('VRC_BADARG get: a lease request is "<ttl_ms>:<token>" (ttl_ms >= 1), with one entry id')
  end
  token = tok
end
local ids = {}
for i = HEAD + 2, #ARGV do ids[#ids + 1] = ARGV[i] end  -- a loop: unpack() has a stack limit (~8000)
local seen = #ids > 1 and {} or nil
for _, id in ipairs(ids) do
  if string.len(id) == 0 then return redis.error_reply('VRC_BADARG get: empty entry id') end
  if seen then
    if seen[id] then return redis.error_reply('VRC_BADARG get: entry id given twice: ' .. id) end
    seen[id] = true
  end
end

-- Reads only, each of a key the writes below touch, so a key of the wrong type fails here, before
-- any write (and leaves the fast path: the full path names the key). Keys this path does not touch
-- are not checked: a hit is served even when, say, the shard's `ghost` set is broken.
local plan = {}       -- per id: a hit {tier key, score, fields, count after the hit, tail}, a miss {false, ghost}
local fast = #ids <= FAST_IDS                     -- more ids take the full path (unpack's limit)
local s2 = fast and redis.pcall('ZMSCORE', l2_key, unpack(ids)) or {err = 'too many ids'}
fast = not s2.err
if fast then
  local in3 = nil
  for i = 1, #ids do
    if s2[i] then plan[i] = {l2_key, tonumber(s2[i])} else in3 = in3 or {}; in3[#in3 + 1] = i end
  end
  if in3 then
    local wanted = {}
    for j, i in ipairs(in3) do wanted[j] = ids[i] end
    local s3 = redis.pcall('ZMSCORE', l3_key, unpack(wanted))
    fast = not s3.err
    for j, i in ipairs(in3) do
      plan[i] = fast and s3[j] and {l3_key, tonumber(s3[j])} or {false}
    end
  end
end
local window = math.floor(now / SWEEP_MS)
local l3_seen = 0
if fast then
  for i, id in ipairs(ids) do
    local p = plan[i]
    if not p[1] then
      -- A miss: in no tier. Fast only if nothing is left to clean up (data without an index entry) and
      -- the shard swept in this window (L2 touched in it: the first touch of a window sweeps).
      local ghost = redis.pcall('ZSCORE', ghost_key, id)
      if type(ghost) == 'table' or redis.call('EXISTS', entry_key(id)) == 1
          or math.floor(newest_touch(l2_key) / SWEEP_MS) ~= window then
        fast = false
        break
      end
      p[2] = ghost ~= false                        -- a miss on an entry a bigger L3 would have kept
    else
      local f = read_fields(entry_key(id), 'v', 'ver', 'x', 's', 'd', 'w', 'n', 'f') or {}
      local ver, n = tonumber(f[2]), tonumber(f[7] or 0)
      local expiry = f[3] and tonumber(f[3])
      local in_l2 = p[1] == l2_key
      -- Integers where the scripts keep them, exactly as the full path checks them (a field written
      -- by hand may hold anything: the full path removes such an entry). The first touch of a tier in
      -- a new SWEEP_MS window takes the full path too: it sweeps.
      if not (f[1] and f[2] and not f[6] and plain_ints(f[2], f[3], f[4], f[5], f[7])
              and not (expiry and now >= expiry)
              and not (in_l2 and idle2 > 0 and now - p[2] >= idle2)
              and not (not in_l2 and (idle3 > 0 and now - p[2] >= idle3 or n + 1 >= promote_after))
              and math.floor(newest_touch(p[1]) / SWEEP_MS) == window) then
        fast = false                               -- anything but a plain hit or miss: the full path
        break
      end
      p[3], p[4] = f, n + 1
      if not in_l2 then                            -- one of the L3 entries a smaller L3 would have lost?
        -- (Counted as the full path counts: after earlier ids of the call were restamped. With a
        -- second L3 hit in the call that differs, so such a call takes the full path.)
        l3_seen = l3_seen + 1
        if l3_seen > 1 then
          fast = false
          break
        end
        p[5] = redis.call('ZCOUNT', l3_key, '-inf', string.format('(%.17g', p[2])) < sizing_step()
      end
    end
  end
end
-- The writes below: HINCRBY on the stats, ZADD on the tiers, HSET on the entries. A user denied one
-- takes the full path, whose checks name what is missing, before any write.
if fast and redis.acl_check_cmd then
  fast = redis.acl_check_cmd('hincrby', stats_key, 'f', '1')
  for i, id in ipairs(ids) do
    local key = plan[i][1]
    if key then
      fast = fast and redis.acl_check_cmd('zadd', key, '1', 'm') and redis.acl_check_cmd('hset', entry_key(id), 'f', 'v')
    else
      if plan[i][2] then fast = fast and redis.acl_check_cmd('zrem', ghost_key, 'm') end
      if token then
        local lease_key = base .. 'lease:' .. id
        fast = fast and redis.acl_check_cmd('set', lease_key, 'v') and redis.acl_check_cmd('pttl', lease_key)
      end
    end
  end
end

if fast then
  -- The counts first: the stats hash is the one key not read above, and an error here (not a hash)
  -- comes before any other write. The full path then names the key.
  local counts = {l2_hits = 0, l3_hits = 0, tail_hits = 0, l1_fills = 0, misses = 0, ghost_hits = 0,
                  l1_hits = l1_hits, l1_evictions = l1_evictions}
  for i = 1, #ids do
    local p = plan[i]
    if not p[1] then
      counts.misses = counts.misses + 1
      if p[2] then counts.ghost_hits = counts.ghost_hits + 1 end
    elseif p[1] == l2_key then
      counts.l2_hits = counts.l2_hits + 1
      if p[4] >= promote_after then counts.l1_fills = counts.l1_fills + 1 end
    else
      counts.l3_hits = counts.l3_hits + 1
      if p[5] then counts.tail_hits = counts.tail_hits + 1 end
    end
  end
  local first = true
  for field, d in pairs(counts) do
    if d > 0 then
      local err = count(field, d)
      if err and first then return full_path(ids, token, lease_ms) end  -- not a hash: the full path names it
      first = false
    end
  end
  local results = {{0, 0, 0, 0, now}}
  for i, id in ipairs(ids) do
    local key, ghost, f, n = unpack(plan[i])
    if not key then
      if ghost then redis.call('ZREM', ghost_key, id) end  -- asked for again: no longer sizing evidence
      results[i + 1] = {0, now}
    else
      local fill = (key == l2_key and n >= promote_after) and 1 or 0
      redis.call('ZADD', key, stamp(key), id)
      if fill == 1 and f[8] ~= '1' then              -- may now live in some L1: its removal is remembered
        redis.call('HSET', entry_key(id), 'n', n, 'f', 1)
      else
        redis.call('HSET', entry_key(id), 'n', n)
      end
      local expiry = tonumber(f[3])
      results[i + 1] = {key == l2_key and 2 or 3, f[1], fill, expiry and (expiry - now) or -1, tonumber(f[2]),
                        tonumber(f[5]) or 0}
    end
  end
  return take_lease(results, ids[1], token, lease_ms)
end

return full_path(ids, token, lease_ms)
