-- One waiting-room decision, atomically (see store.rs for the rules;
-- this script follows LocalStore::decide line by line).
--
-- KEYS (one hash tag per room, so Redis Cluster keeps them in one slot):
--   1 waiting  ZSET  number -> place (the number, or a drawn place)
--   2 beats    ZSET  number -> poll deadline (ms)
--   3 active   ZSET  "r<n>" reserved slot / "s<n>" session -> expiry (ms)
--   4 meta     HASH  tokens, last, issued, serving, admitted, shuffled,
--                    live_rate, live_queue_all
--   5 owner    HASH  number -> client network
--   6 pfx      HASH  client network -> tickets waiting
-- ARGV: ask, number, prefix, now_ms, rate_per_s, active_cap, session_ms,
--   grace_ms, queue_all, prequeue, reject, random, score, prefix_cap,
--   shuffle_at_ms, seed
-- Returns: {verdict, number, position, flag, waiting, active, serving,
--   issued, admitted, live_rate, live_queue_all}
--   verdict 1 waiting (flag: rejoined), 2 admitted (flag: fresh),
--   3 renewed, 4 prefix cap, 5 full, 6 done
local waiting, beats, active, meta, owner, pfx = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ask = ARGV[1]
local number = ARGV[2]
local prefix = ARGV[3]
local now = tonumber(ARGV[4])
local rate = tonumber(ARGV[5])
local cap = tonumber(ARGV[6])
local session_ms = tonumber(ARGV[7])
local grace_ms = tonumber(ARGV[8])
local queue_all = ARGV[9] == '1'
local prequeue = ARGV[10] == '1'
local reject = ARGV[11] == '1'
local random = ARGV[12] == '1'
local score = tonumber(ARGV[13])
local prefix_cap = tonumber(ARGV[14])
local shuffle_at = tonumber(ARGV[15])
local seed = tonumber(ARGV[16])

local function forget_owner(n)
  local p = redis.call('HGET', owner, n)
  if p then
    redis.call('HDEL', owner, n)
    if redis.call('HINCRBY', pfx, p, -1) <= 0 then
      redis.call('HDEL', pfx, p)
    end
  end
end

local function leave(n)
  redis.call('ZREM', waiting, n)
  redis.call('ZREM', beats, n)
  forget_owner(n)
end

-- 1. Reap.
local gone = redis.call('ZRANGEBYSCORE', beats, '-inf', '(' .. now, 'LIMIT', 0, 1000)
for _, n in ipairs(gone) do
  leave(n)
end
redis.call('ZREMRANGEBYSCORE', active, '-inf', '(' .. now)

-- 2. Shuffle once (HSETNX: only one gateway's call does it).
if shuffle_at > 0 and now >= shuffle_at and redis.call('HSETNX', meta, 'shuffled', '1') == 1 then
  local members = redis.call('ZRANGE', waiting, 0, -1, 'WITHSCORES')
  local ns, ss = {}, {}
  for i = 1, #members, 2 do
    ns[#ns + 1] = members[i]
    ss[#ss + 1] = members[i + 1]
  end
  math.randomseed(seed)
  for i = #ss, 2, -1 do
    local j = math.random(i)
    ss[i], ss[j] = ss[j], ss[i]
  end
  for i = 1, #ns do
    redis.call('ZADD', waiting, ss[i], ns[i])
  end
end

-- 3. Advance.
local m = redis.call('HMGET', meta, 'tokens', 'last', 'issued', 'serving', 'admitted', 'live_rate', 'live_queue_all')
if m[6] then
  rate = tonumber(m[6])
end
if m[7] then
  queue_all = m[7] == '1'
end
local hold = queue_all or prequeue
local burst = math.max(rate, 1)
local tokens = tonumber(m[1])
if tokens then
  tokens = math.min(burst, tokens + math.max(0, now - tonumber(m[2])) * rate / 1000)
else
  tokens = burst
end
local issued = tonumber(m[3]) or 0
local serving = tonumber(m[4]) or 0
local admitted = tonumber(m[5]) or 0
if not hold then
  local k = math.min(math.floor(tokens), cap - redis.call('ZCARD', active), 1000)
  if k > 0 then
    local popped = redis.call('ZPOPMIN', waiting, k)
    for i = 1, #popped, 2 do
      local n = popped[i]
      redis.call('ZREM', beats, n)
      forget_owner(n)
      redis.call('ZADD', active, now + grace_ms, 'r' .. n)
      tokens = tokens - 1
      admitted = admitted + 1
      if tonumber(n) > serving then
        serving = tonumber(n)
      end
    end
  end
end

-- 4. The ask.
local function join()
  if not hold and redis.call('ZCARD', waiting) == 0 and tokens >= 1 and redis.call('ZCARD', active) < cap then
    tokens = tokens - 1
    issued = issued + 1
    admitted = admitted + 1
    redis.call('ZADD', active, now + session_ms, 's' .. issued)
    if issued > serving then
      serving = issued
    end
    return {2, issued, 0, 1}
  end
  if reject then
    return {5, 0, 0, 0}
  end
  if prefix_cap > 0 and (tonumber(redis.call('HGET', pfx, prefix)) or 0) >= prefix_cap then
    return {4, 0, 0, 0}
  end
  issued = issued + 1
  local s = issued
  if random then
    s = score
  end
  redis.call('ZADD', waiting, s, issued)
  redis.call('ZADD', beats, now + grace_ms, issued)
  redis.call('HSET', owner, issued, prefix)
  redis.call('HINCRBY', pfx, prefix, 1)
  return {1, issued, redis.call('ZCOUNT', waiting, '-inf', '(' .. s) + 1, 1}
end

local r
if ask == 'status' then
  r = {6, 0, 0, 0}
elseif ask == 'release' then
  redis.call('ZREM', active, 's' .. number, 'r' .. number)
  r = {6, 0, 0, 0}
elseif ask == 'session' then
  if redis.call('ZSCORE', active, 's' .. number) then
    redis.call('ZADD', active, now + session_ms, 's' .. number)
    r = {3, tonumber(number), 0, 0}
  else
    r = join()
  end
elseif ask == 'poll' then
  local s = redis.call('ZSCORE', waiting, number)
  if s then
    redis.call('ZADD', beats, now + grace_ms, number)
    r = {1, tonumber(number), redis.call('ZCOUNT', waiting, '-inf', '(' .. s) + 1, 0}
  elseif redis.call('ZREM', active, 'r' .. number) == 1 then
    redis.call('ZADD', active, now + session_ms, 's' .. number)
    r = {2, tonumber(number), 0, 1}
  elseif redis.call('ZSCORE', active, 's' .. number) then
    redis.call('ZADD', active, now + session_ms, 's' .. number)
    r = {2, tonumber(number), 0, 0}
  else
    r = join()
  end
else
  r = join()
end

redis.call('HSET', meta, 'tokens', tostring(tokens), 'last', now, 'issued', issued, 'serving', serving, 'admitted', admitted)
r[5] = redis.call('ZCARD', waiting)
r[6] = redis.call('ZCARD', active)
r[7] = serving
r[8] = issued
r[9] = admitted
r[10] = m[6] or ''
r[11] = m[7] or ''
return r
