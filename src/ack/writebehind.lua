#!lua name=writebehind
-- writebehind's Redis function library. The service loads it with FUNCTION LOAD REPLACE when the
-- primary holds no version or an older one (writebehind_version). Every write this library makes
-- on behalf of a `#` op is preceded, in the same atomic unit, by
--     PUBLISH __writebehind__ <kind>:<op length>:<op><key>
-- so that the service recognises it in the replication stream (README, "The # op field"). In a
-- Redis Cluster, where PUBLISH is not replicated, by
--     SET <tag key> <kind>:<op length>:<op><key>    DEL <tag key>
-- with a tag key in the key's slot (tag_key below), which leaves nothing behind.

local VERSION = 4
-- Lua's unpack takes a few thousand values at most: commands are sent in chunks of this many.
local CHUNK = 1000
local CHANNEL = '__writebehind__'

-- Whether this server is a cluster node (`INFO cluster`), asked once per library load: a node
-- cannot leave or join cluster mode without a restart, which loads the library again.
local cluster_mode = nil
local function in_cluster()
  if cluster_mode == nil then
    cluster_mode = string.find(redis.call('INFO', 'cluster'), 'cluster_enabled:1', 1, true) ~= nil
  end
  return cluster_mode
end

-- A key in KEY's slot, or nil when none can be named: the key's hash tag (its first `{...}`
-- that is not empty) stays first with a prefix without braces; a key without one and without
-- `}` is hashed whole, so it becomes the hash tag. (A key with `}` and no hash tag: nil.)
local function tag_key(key)
  local open = string.find(key, '{', 1, true)
  if open then
    local close = string.find(key, '}', open + 1, true)
    if close and close > open + 1 then
      return CHANNEL .. ':' .. key
    end
  end
  if #key > 0 and not string.find(key, '}', 1, true) then
    return CHANNEL .. ':{' .. key .. '}'
  end
  return nil
end

local function tag(kind, op, key)
  local payload = kind .. ':' .. #op .. ':' .. op .. key
  local reserved = in_cluster() and tag_key(key)
  if reserved then
    redis.call('SET', reserved, payload)
    redis.call('DEL', reserved)
  else
    redis.call('PUBLISH', CHANNEL, payload)
  end
end

-- redis.call(command, key, values...) for `values` in chunks.
local function chunked(command, key, values)
  for first = 1, #values, CHUNK do
    redis.call(command, key, unpack(values, first, math.min(first + CHUNK - 1, #values)))
  end
end

local function is_op(c)
  return c == '=' or c == '+' or c == '-' or c == '~'
end

-- writebehind_version: the library's version, an integer.
local function version()
  return VERSION
end

-- writebehind_hset KEY field value [field value ...] [# <op>[uuid]]
-- HSET with the `#` op applied in the same instant (read-your-write): `=` (the default) and `+`
-- store the fields, `-` and `~` delete the key. `#` is never stored. An invalid op is refused
-- and nothing is written. Returns the number of fields added (`=`, `+`) or of keys deleted.
local function hset(keys, args)
  local key = keys[1]
  if #args % 2 ~= 0 then
    return redis.error_reply('ERR writebehind_hset needs field value pairs')
  end
  local op = '='
  local fields = {}
  for i = 1, #args, 2 do
    if args[i] == '#' then
      op = args[i + 1]
    else
      fields[#fields + 1] = args[i]
      fields[#fields + 1] = args[i + 1]
    end
  end
  if not is_op(string.sub(op, 1, 1)) then
    return redis.error_reply('ERR invalid # op "' .. op .. '": the first character must be one of = + - ~')
  end
  if in_cluster() and not tag_key(key) then
    return redis.error_reply('ERR writebehind_hset: in a Redis Cluster the key needs a hash tag ({...}) or no "}"')
  end
  tag('op', op, key)
  local c = string.sub(op, 1, 1)
  if c == '-' or c == '~' then
    return redis.call('DEL', key)
  end
  if #fields == 0 then
    return 0
  end
  local added = 0
  for first = 1, #fields, CHUNK * 2 do
    added = added + redis.call('HSET', key, unpack(fields, first, math.min(first + CHUNK * 2 - 1, #fields)))
  end
  return added
end

-- writebehind_complete KEY n_raw field value ... n_target field value ... persist nonce
-- Completes a `#` op written with a plain HSET: if KEY holds exactly the raw fields (what the
-- service has seen in the stream), make it hold the target fields (the state the op gives), and
-- drop its TTL when persist is 1; n_target 0 deletes the key. Returns 1 if done, 0 if the key has
-- changed since (the service retries once it has seen that change). The tag carries `nonce`, a
-- random value the service chose for this call: only a completion it issued counts as one.
local function complete(keys, args)
  local key = keys[1]
  local i = 1
  local n_raw = tonumber(args[i])
  i = i + 1
  local raw = {}
  for _ = 1, n_raw do
    raw[args[i]] = args[i + 1]
    i = i + 2
  end
  local n_target = tonumber(args[i])
  i = i + 1
  local target = {}
  local order = {}
  for _ = 1, n_target do
    target[args[i]] = args[i + 1]
    order[#order + 1] = args[i]
    i = i + 2
  end
  local persist = args[i] == '1'
  local nonce = args[i + 1] or ''
  if redis.call('TYPE', key)['ok'] ~= 'hash' or redis.call('HLEN', key) ~= n_raw then
    return 0
  end
  local current = redis.call('HGETALL', key)
  for j = 1, #current, 2 do
    if raw[current[j]] ~= current[j + 1] then
      return 0
    end
  end
  tag('complete', nonce, key)
  if n_target == 0 then
    redis.call('DEL', key)
    return 1
  end
  local set = {}
  for _, f in ipairs(order) do
    if raw[f] ~= target[f] then
      set[#set + 1] = f
      set[#set + 1] = target[f]
    end
  end
  if #set > 0 then
    chunked('HSET', key, set)
  end
  local doomed = {}
  for f, _ in pairs(raw) do
    if target[f] == nil then
      doomed[#doomed + 1] = f
    end
  end
  if #doomed > 0 then
    chunked('HDEL', key, doomed)
  end
  if persist then
    redis.call('PERSIST', key)
  end
  return 1
end

-- writebehind_ack STREAM expire_secs status [reason]
-- An acknowledgement: XADD STREAM * status <status> [reason <reason>], then EXPIRE, but only
-- when this XADD created the stream: a stream that already existed is someone's (or an earlier
-- copy of this ack, which has its TTL) and keeps the TTL it has.
local function ack(keys, args)
  local created = redis.call('EXISTS', keys[1]) == 0
  if args[3] then
    redis.call('XADD', keys[1], '*', 'status', args[2], 'reason', args[3])
  else
    redis.call('XADD', keys[1], '*', 'status', args[2])
  end
  if created then
    redis.call('EXPIRE', keys[1], args[1])
  end
  return 1
end

redis.register_function{function_name = 'writebehind_version', callback = version, flags = {'no-writes'}}
redis.register_function('writebehind_hset', hset)
redis.register_function('writebehind_complete', complete)
redis.register_function('writebehind_ack', ack)
