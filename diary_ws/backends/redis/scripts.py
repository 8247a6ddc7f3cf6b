"""The Lua scripts the Redis backend runs: each decision that reads presence is one atomic round trip.

Plain strings, so this module imports no Redis client. Key names are built from a prefix passed as ARGV[1]
(KEYS lists the fixed keys; per-node keys are derived, which is fine on a single Redis, not on a Cluster).

A node is live while its heartbeat key `<prefix>node:<id>` exists. A script that finds a node in the set
`<prefix>nodes` without a heartbeat forgets it and deletes its presence hash, so a killed node's users leave
`status` within one heartbeat TTL.
"""

from __future__ import annotations

# The live nodes, pruning dead ones. Shared by the scripts below.
_LIVE = """
local function live_nodes(nodes_key, prefix)
  local live = {}
  for _, n in ipairs(redis.call('SMEMBERS', nodes_key)) do
    if redis.call('EXISTS', prefix .. 'node:' .. n) == 1 then
      table.insert(live, n)
    else
      redis.call('SREM', nodes_key, n)
      redis.call('DEL', prefix .. 'presence:' .. n)
    end
  end
  return live
end
"""

# KEYS: nodes, feed, epoch, the request's record (its Idempotency-Key's, or one of its own).
# ARGV: prefix, maxlen, number of targets, the targets..., then the request's token, the key's fingerprint
# ('' without a key), the record's TTL in ms, the epoch the node knows, then field, value pairs.
# Returns {outcome, {live nodes}, id}, where outcome is
# - 'added' (id: the entry's): stored now, or by an earlier attempt of this same request (its token), so a
#   request may send this script again after a lost answer and still store the message once;
# - 'nobody': no target is connected, nothing stored (the 404 decision and the XADD in one step, so no node
#   can miss it); a number of targets of -1 adds the entry whoever is connected (a control entry);
# - 'epoch': Redis is not the one the node knows (it lost its data and no reader has repaired the stream
#   yet), nothing stored;
# - 'busy' / 'other': another request holds the Idempotency-Key, with the same notification or another one.
PUBLISH = (
    _LIVE
    + """
local prefix, maxlen, ntargets = ARGV[1], ARGV[2], tonumber(ARGV[3])
local anyone = ntargets < 0
if anyone then ntargets = 0 end
local base = 3 + ntargets
local token, fp, ttl, epoch = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
local live = live_nodes(KEYS[1], prefix)
if redis.call('GET', KEYS[3]) ~= epoch then return {'epoch', live} end
local seen = redis.call('HMGET', KEYS[4], 'r', 'fp', 'id')
if seen[3] then
  if seen[1] == token then return {'added', live, seen[3]} end
  if seen[2] ~= fp then return {'other', live} end
  return {'busy', live}
end
for _, n in ipairs(live) do
  if anyone then break end
  local key = prefix .. 'presence:' .. n
  if ntargets == 0 then
    anyone = redis.call('HLEN', key) > 0
  else
    for i = 4, 3 + ntargets do
      if redis.call('HEXISTS', key, ARGV[i]) == 1 then anyone = true break end
    end
  end
  if anyone then break end
end
if not anyone then return {'nobody', live} end
local fields = {}
for i = base + 5, #ARGV do table.insert(fields, ARGV[i]) end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(fields))
redis.call('HSET', KEYS[4], 'r', token, 'fp', fp, 'id', id)
redis.call('PEXPIRE', KEYS[4], ttl)
return {'added', live, id}
"""
)

# A whole batch in one step, recorded like PUBLISH. KEYS: nodes, feed, epoch, the request's record.
# ARGV: prefix, maxlen, the request's token, the key's fingerprint ('' without a key), the record's TTL in ms,
# the epoch the node knows, the number of items, then per item: its number of targets (0: everyone), the
# targets, its number of fields, the field, value pairs.
# Returns {outcome, {live nodes}, marks}: outcome as PUBLISH's ('added', 'epoch', 'busy', 'other'; never
# 'nobody': that is per item), marks one per item, in order, joined by commas: the entry's id, or '-' when
# none of its targets is connected (the 404 decision and the XADD of each item as in PUBLISH). The record
# is written only when some item was stored; its 'id' is the first stored id (what IDEM_BEGIN dates it by),
# its 'ids' the marks after 'batch:' (what IDEM_BEGIN hands on for a batch that never answered).
PUBLISH_BATCH = (
    _LIVE
    + """
local prefix, maxlen, token, fp, ttl, epoch = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local nitems = tonumber(ARGV[7])
local live = live_nodes(KEYS[1], prefix)
if redis.call('GET', KEYS[3]) ~= epoch then return {'epoch', live} end
local seen = redis.call('HMGET', KEYS[4], 'r', 'fp', 'id', 'ids')
if seen[3] then
  if seen[1] == token and seen[4] then return {'added', live, string.sub(seen[4], 7)} end
  if seen[2] ~= fp then return {'other', live} end
  return {'busy', live}
end
local anyone_at_all = nil
local function connected(i, ntargets)
  if ntargets == 0 then
    if anyone_at_all == nil then
      anyone_at_all = false
      for _, n in ipairs(live) do
        if redis.call('HLEN', prefix .. 'presence:' .. n) > 0 then anyone_at_all = true break end
      end
    end
    return anyone_at_all
  end
  for _, n in ipairs(live) do
    local key = prefix .. 'presence:' .. n
    for j = i, i + ntargets - 1 do
      if redis.call('HEXISTS', key, ARGV[j]) == 1 then return true end
    end
  end
  return false
end
local marks, first_id = {}, nil
local i = 8
for _ = 1, nitems do
  local ntargets = tonumber(ARGV[i])
  local nfields = tonumber(ARGV[i + 1 + ntargets])
  local first = i + 2 + ntargets
  if connected(i + 1, ntargets) then
    local fields = {}
    for j = first, first + 2 * nfields - 1 do table.insert(fields, ARGV[j]) end
    local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(fields))
    first_id = first_id or id
    table.insert(marks, id)
  else
    table.insert(marks, '-')
  end
  i = first + 2 * nfields
end
local joined = table.concat(marks, ',')
if first_id then
  redis.call('HSET', KEYS[4], 'r', token, 'fp', fp, 'id', first_id, 'ids', 'batch:' .. joined)
  redis.call('PEXPIRE', KEYS[4], ttl)
end
return {'added', live, joined}
"""
)

# KEYS: nodes. ARGV: prefix, this node, user, this node's count of the user (the new socket included),
# limit, presence TTL in ms. Returns {accepted 0/1, sockets of the user on other nodes, registered 0/1}.
JOIN = (
    _LIVE
    + """
local prefix, me, user, mine, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local others = 0
for _, n in ipairs(live_nodes(KEYS[1], prefix)) do
  if n ~= me then others = others + tonumber(redis.call('HGET', prefix .. 'presence:' .. n, user) or '0') end
end
local registered = redis.call('EXISTS', prefix .. 'node:' .. me)
if others + mine > limit then return {0, others, registered} end
local key = prefix .. 'presence:' .. me
redis.call('HSET', key, user, mine)
redis.call('PEXPIRE', key, ARGV[6])
return {1, others, registered}
"""
)

# KEYS: nodes. ARGV: prefix. Returns {node, {user, count, ...}, node, ...} over the live nodes.
STATUS = (
    _LIVE
    + """
local out = {}
for _, n in ipairs(live_nodes(KEYS[1], ARGV[1])) do
  table.insert(out, n)
  table.insert(out, redis.call('HGETALL', ARGV[1] .. 'presence:' .. n))
end
return out
"""
)

# KEYS: nodes. ARGV: prefix, user. Returns the user's sockets summed over the live nodes (presence query).
PRESENCE = (
    _LIVE
    + """
local total = 0
for _, n in ipairs(live_nodes(KEYS[1], ARGV[1])) do
  total = total + tonumber(redis.call('HGET', ARGV[1] .. 'presence:' .. n, ARGV[2]) or '0')
end
return total
"""
)

_INFO = """
local function last_and_deleted(stream)
  local last, deleted = '0-0', '0-0'
  if redis.call('EXISTS', stream) == 1 then
    local info = redis.call('XINFO', 'STREAM', stream)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then last = info[i + 1] end
      if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
    end
  end
  return last, deleted
end
"""

# KEYS: feed, epoch. ARGV: the last id this reader saw ("0-0" if none). Run by every reader when it
# (re)connects. Returns {1 if the data was lost, last id, epoch, max deleted id}. The epoch names this
# Redis's data: a reader that finds another one than it knew has missed whatever the old data held.
# Without the epoch key this Redis has lost its data (a restart without persistence) or never had any: the
# stream is marked "everything up to now was deleted", so a `since` from before reads `recovered: false`.
# "Now" is the later of Redis's clock and the reader's last id, so new ids follow the old ones even if the
# restarted Redis's clock is behind.
REPAIR = (
    _INFO
    + """
local known = redis.call('GET', KEYS[2])
if known then
  local last, deleted = last_and_deleted(KEYS[1])
  return {0, last, known, deleted}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], 'diary-ws-init', '$', 'MKSTREAM')
  redis.call('XGROUP', 'DESTROY', KEYS[1], 'diary-ws-init')
end
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function later(a, b)
  local ams, aseq = parts(a)
  local bms, bseq = parts(b)
  if ams > bms or (ams == bms and aseq >= bseq) then return a end
  return b
end
local last = last_and_deleted(KEYS[1])
local top = later(later(last, ARGV[1]), string.format('%.0f', now) .. '-0')
redis.call('XSETID', KEYS[1], top, 'MAXDELETEDID', top)
local epoch = t[1] .. '.' .. t[2]
redis.call('SET', KEYS[2], epoch)
return {1, top, epoch, top}
"""
)

# KEYS: feed. ARGV: since (an id), count. Returns {seconds, microseconds, last id, max deleted id, entries
# newest first}: the entries after `since`, at most `count`, read with the stream's state in one step.
REPLAY = (
    _INFO
    + """
local t = redis.call('TIME')
local last, deleted = last_and_deleted(KEYS[1])
local entries = redis.pcall('XREVRANGE', KEYS[1], '+', '(' .. ARGV[1], 'COUNT', ARGV[2])
if type(entries) ~= 'table' or entries.err then entries = {} end
return {t[1], t[2], last, deleted, entries}
"""
)

# A token bucket every node shares. KEYS: the bucket. ARGV: burst, tokens per second, TTL in ms, cost.
# Returns {1 if `cost` tokens were taken (all or none), the tokens left as a string}. Redis's clock, so nodes'
# clocks do not matter.
RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local burst, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'when')
local tokens, when = tonumber(b[1]) or burst, tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - when) * rate)
local cost = tonumber(ARGV[4]) or 1
local taken = 0
if tokens >= cost then
  tokens = tokens - cost
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'when', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {taken, string.format('%.6f', tokens)}
"""

# Idempotency keys. PUBLISH records a key with its message (fingerprint, entry id); FINISH adds the answer.
# BEGIN, before a publish, reads the record. KEYS: the key's hash, nodes. ARGV: fingerprint, busy window in ms.
# Returns {'first'} (no message under this key) | {'other'} (another notification) | {'done', status, body} |
# {'busy'} (stored less than the busy window ago, by Redis's clock, and no answer yet: the first request may
# still be answering) | {'stale', id, nodes} (stored, and the request that stored it never answered).
IDEM_BEGIN = """
local e = redis.call('HMGET', KEYS[1], 'fp', 'id', 'status', 'body', 'ids')
if not e[2] then return {'first'} end
if e[1] ~= ARGV[1] then return {'other'} end
if e[3] then return {'done', e[3], e[4]} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(string.match(e[2], '^(%d+)-'))
if now - ms < tonumber(ARGV[2]) then return {'busy'} end
return {'stale', e[5] or e[2], redis.call('SCARD', KEYS[2])}
"""

# FINISH ARGV: status, body, TTL in ms. Only a key still waiting for its answer takes one.
IDEM_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'status') == 0 then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'body', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
"""

# A key with a stored message is never forgotten before its TTL: a retry must find it.
IDEM_ABANDON = """
if redis.call('HEXISTS', KEYS[1], 'id') == 0 and redis.call('HEXISTS', KEYS[1], 'status') == 0 then
  redis.call('DEL', KEYS[1])
end
return 0
"""

# One page of a replay. KEYS: the feed. ARGV: the id to read after, the most entries to read. Returns
# {Redis's TIME seconds, microseconds, the last id, max-deleted-entry-id, up to ARGV[2] entries after ARGV[1],
# the first entry's id or '', 1 if the stream ever lost entries}. Trimming (MAXLEN, XTRIM) does not move
# max-deleted-entry-id, so a stream that has lost entries (entries-added over its length) is taken to have
# lost everything before its first entry.
REPLAY_PAGE = """
local t = redis.call('TIME')
local last, deleted, first, lost = '0-0', '0-0', '', 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local added, length = 0, 0
  for i = 1, #info, 2 do
    local k, v = info[i], info[i + 1]
    if k == 'last-generated-id' then last = v
    elseif k == 'max-deleted-entry-id' then deleted = v
    elseif k == 'entries-added' then added = v
    elseif k == 'length' then length = v
    elseif k == 'first-entry' and type(v) == 'table' then first = v[1] end
  end
  if added > length then lost = 1 end
end
local entries = redis.pcall('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
if type(entries) ~= 'table' or entries.err then entries = {} end
return {t[1], t[2], last, deleted, entries, first, lost}
"""

# HISTORY_BYTES on the stream. KEYS: the feed. ARGV: the cap in bytes. When the stream's memory, as Redis
# estimates it (MEMORY USAGE, sampled), is over the cap, the oldest entries go (XTRIM MAXLEN, exact) in the
# share by which it is over. Returns {the bytes estimated, the entries trimmed}.
TRIM_BYTES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local used = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', 16)
local cap = tonumber(ARGV[1])
if used <= cap then return {used, 0} end
local n = redis.call('XLEN', KEYS[1])
local keep = math.max(1, math.floor(n * cap / used))
return {used, redis.call('XTRIM', KEYS[1], 'MAXLEN', keep)}
"""

ALL = (
    PUBLISH, PUBLISH_BATCH, JOIN, STATUS, PRESENCE, REPAIR, REPLAY, REPLAY_PAGE, TRIM_BYTES, RATE, IDEM_BEGIN,
    IDEM_FINISH, IDEM_ABANDON,
)  # fmt: skip
