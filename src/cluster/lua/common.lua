-- Shared by every ledger script. KEYS: 1 meta, 2 res, 3 users, 4 idem, 5 pending, 6 holds.
-- A `res` entry is "status\31quantity\31user\31key"; status is `new` (allocated, its row not
-- yet known to have committed) or the active status its row has (held, issued, confirmed,
-- redeemed). Released reservations have no entry.
local SEP = '\31'
local RANK = { new = 0, held = 1, issued = 2, confirmed = 2, redeemed = 3 }

local function entry_of(raw)
  local a = string.find(raw, SEP, 1, true)
  local b = string.find(raw, SEP, a + 1, true)
  local c = string.find(raw, SEP, b + 1, true)
  return string.sub(raw, 1, a - 1), tonumber(string.sub(raw, a + 1, b - 1)),
    string.sub(raw, b + 1, c - 1), string.sub(raw, c + 1)
end

-- Which counter a reservation's units are in: held (tickets until confirmed) or sold.
local function bucket(status, kind)
  if status == 'held' or (status == 'new' and kind == 'ticket') then return 'held' end
  return 'sold'
end

-- Brings one reservation's entry to what its row says. Idempotent, and never moves backwards,
-- so late or repeated reports from any node are harmless.
local function sync(id, status, expires, kind)
  local raw = redis.call('HGET', KEYS[2], id)
  if not raw then
    redis.call('ZREM', KEYS[5], id)
    return
  end
  local cur, qty, user, key = entry_of(raw)
  if RANK[status] == nil then
    redis.call('HINCRBY', KEYS[1], bucket(cur, kind), -qty)
    if redis.call('HINCRBY', KEYS[3], user, -qty) <= 0 then redis.call('HDEL', KEYS[3], user) end
    if cur == 'new' then
      redis.call('HINCRBY', KEYS[1], 'inflight', -1)
      -- Its first answer was never a success: a retry with the key starts afresh.
      if key ~= '' then redis.call('HDEL', KEYS[4], user .. SEP .. key) end
    end
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZREM', KEYS[6], id)
    return
  end
  redis.call('ZREM', KEYS[5], id)
  if RANK[status] <= RANK[cur] then return end
  local from, to = bucket(cur, kind), bucket(status, kind)
  if from ~= to then
    redis.call('HINCRBY', KEYS[1], from, -qty)
    redis.call('HINCRBY', KEYS[1], to, qty)
  end
  if cur == 'new' then redis.call('HINCRBY', KEYS[1], 'inflight', -1) end
  redis.call('HSET', KEYS[2], id, status .. SEP .. qty .. SEP .. user .. SEP .. key)
  if status == 'held' and expires ~= '' then
    redis.call('ZADD', KEYS[6], tonumber(expires), id)
  else
    redis.call('ZREM', KEYS[6], id)
  end
end

local function counts()
  local m = redis.call('HMGET', KEYS[1], 'stock', 'held', 'sold', 'inflight')
  local due = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
  return { m[1], m[2], m[3], m[4], due[2] or '' }
end

-- Every script first checks the ledger exists and is the generation the node allocates under.
local function check_generation(expected)
  local gen = redis.call('HGET', KEYS[1], 'gen')
  if not gen then return { 'NOLEDGER' } end
  if gen ~= expected then return { 'GENERATION', gen } end
  return nil
end
