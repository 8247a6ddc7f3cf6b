"""The Lua scripts the Redis backend runs: each decision that reads presence is one atomic round trip.

Plain strings, so this module imports no Redis client. Key names are built from a prefix passed as ARGV[1]
(KEYS lists the fixed keys; per-node and per-user keys are derived, which is fine on a single Redis, not on a
Cluster). The layout is in docs/cluster.md: a feed (the history's bodies), one inbox stream per node (what
that node delivers, in id order), a per-user presence index and a per-user history index.

A node is live while its heartbeat key `<prefix>node:<id>` exists. A script that finds a node in the set
`<prefix>nodes` without a heartbeat forgets it and deletes its presence hash, so a killed node's users leave
`status` within one heartbeat TTL.
"""

from __future__ import annotations

# The live nodes, pruning dead ones; `forget` drops a dead node's presence, its inbox, and its entries in the
# per-user index `<prefix>where:<user>` (node -> sockets), once, when a script first finds it dead.
_LIVE = """
local function forget(nodes_key, prefix, n)
  redis.call('SREM', nodes_key, n)
  local presence = prefix .. 'presence:' .. n
  for _, user in ipairs(redis.call('HKEYS', presence)) do redis.call('HDEL', prefix .. 'where:' .. user, n) end
  redis.call('DEL', presence, prefix .. 'inbox:' .. n)
end
local function live_nodes(nodes_key, prefix)
  local live = {}
  for _, n in ipairs(redis.call('SMEMBERS', nodes_key)) do
    if redis.call('EXISTS', prefix .. 'node:' .. n) == 1 then
      table.insert(live, n)
    else
      forget(nodes_key, prefix, n)
    end
  end
  return live
end
-- The live nodes that hold `user`, from the per-user index: its cost is the user's nodes, not the cluster's.
-- An entry of a node whose heartbeat is gone is dropped here (the node is forgotten by the next full scan).
local function holders(prefix, user)
  local where = prefix .. 'where:' .. user
  local out = {}
  local flat = redis.call('HGETALL', where)
  for i = 1, #flat, 2 do
    if redis.call('EXISTS', prefix .. 'node:' .. flat[i]) == 1 then
      table.insert(out, {flat[i], tonumber(flat[i + 1])})
    else
      redis.call('HDEL', where, flat[i])
    end
  end
  return out
end
"""

# Where an entry goes and how it is stored, shared by PUBLISH and PUBLISH_BATCH.
# `route`: the nodes an entry goes to (ARGV[first .. first + ntargets - 1] are its targets; mode `all`: every
# live node, or none when nobody is connected anywhere; `users` / `close`: the live nodes that hold a target).
# `store`: the XADD to the feed (the bodies), the history window, the user's (or broadcast) index, then the
# inbox of every node in `to`, in one step, so each inbox gets its entries in id order. The window is the last
# `size` messages: `seq` counts them and `ring` keeps each one's id at seq mod (size + 1), so the newest
# message outside the window is one HGET away (see REPLAY).
_ROUTE = """
local function route(nodes_key, prefix, mode, first, ntargets)
  local to = {}
  if mode == 'all' or mode == 'every' then
    local anyone = mode == 'every'
    for _, n in ipairs(live_nodes(nodes_key, prefix)) do
      table.insert(to, n)
      if not anyone then anyone = redis.call('HLEN', prefix .. 'presence:' .. n) > 0 end
    end
    if not anyone then return {} end
    return to
  end
  local have = {}
  for i = first, first + ntargets - 1 do
    for _, h in ipairs(holders(prefix, ARGV[i])) do
      if not have[h[1]] then
        have[h[1]] = true
        table.insert(to, h[1])
      end
    end
  end
  return to
end
-- Whether every key `store` will write is in this Redis, before it writes any. Only on Redis Cluster (its
-- prefixes open a hash tag), where a slot being moved to another master holds some of its keys here and some
-- there: a command on one already there fails inside the script, after the writes before it, and `pcall`
-- would skip it in silence. The caller answers {'moving'}, nothing written, and the node sends it again.
local function here(prefix, mode, first, ntargets, to)
  if string.sub(prefix, 1, 1) ~= '{' then return true end
  local keys = {}
  for _, n in ipairs(to) do table.insert(keys, prefix .. 'inbox:' .. n) end
  if mode ~= 'close' then
    table.insert(keys, prefix .. 'seq')
    table.insert(keys, prefix .. 'ring')
    if mode == 'all' or mode == 'every' then
      table.insert(keys, prefix .. 'all')
    else
      for i = first, first + ntargets - 1 do table.insert(keys, prefix .. 'u:' .. ARGV[i]) end
    end
  end
  for _, key in ipairs(keys) do
    local found = redis.pcall('EXISTS', key)
    if type(found) == 'table' and found.err then return false end
  end
  return true
end
local function store(feed, prefix, limits, mode, first, ntargets, fields, to)
  local id = redis.call('XADD', feed, 'MAXLEN', '~', limits.feed, '*', unpack(fields))
  if mode ~= 'close' then
    local seq = redis.call('INCR', prefix .. 'seq')
    redis.call('HSET', prefix .. 'ring', seq % (limits.size + 1), id)
    if mode == 'all' or mode == 'every' then
      redis.pcall('XADD', prefix .. 'all', 'MAXLEN', '~', limits.size, id, 'x', '')
    else
      for i = first, first + ntargets - 1 do
        local index = prefix .. 'u:' .. ARGV[i]
        redis.pcall('XADD', index, 'MAXLEN', '~', limits.size, id, 'x', '')
        redis.call('PEXPIRE', index, limits.ttl)
      end
    end
  end
  for _, n in ipairs(to) do
    redis.pcall('XADD', prefix .. 'inbox:' .. n, 'MAXLEN', '~', limits.inbox, id, unpack(fields))
  end
  return id
end
"""

# KEYS: nodes, feed, epoch, the request's record (its Idempotency-Key's, or one of its own).
# ARGV: prefix, feed maxlen, inbox maxlen, history size, index TTL in ms, mode, number of targets, the
# targets..., then the request's token, the key's fingerprint ('' without a key), the record's TTL in ms, the
# epoch the node knows, then field, value pairs.
# Mode `all`: a broadcast, to every live node (nobody if no one is connected anywhere); `users`: to the nodes
# that hold a target, found in the per-user index (nobody if none does); `close`: a control entry to the nodes
# that hold the one target, kept in no history index. `every` and `keep` are `all` and `users` stored even when
# nobody is there: on Redis Cluster, a shard's part of a message that another shard's users got (so its own
# users find it when they resume; backends/redis/sharded.py).
# Returns {outcome, {the nodes it was written to}, id}, where outcome is
# - 'added' (id: the entry's): stored now, or by an earlier attempt of this same request (its token, and the
#   nodes it went to then), so a request may send this script again after a lost answer and store it once;
# - 'nobody': no target is connected, nothing stored (the 404 decision and the XADD in one step);
# - 'epoch': Redis is not the one the node knows (it lost its data and no reader has repaired the stream
#   yet), nothing stored;
# - 'busy' / 'other': another request holds the Idempotency-Key, with the same notification or another one;
# - 'moving': on Redis Cluster, a key it would write is on another master (its slot is being moved), nothing
#   stored: the node sends it again (client.py, `_script_on`).
PUBLISH = (
    _LIVE
    + _ROUTE
    + """
local prefix = ARGV[1]
local limits = {feed = ARGV[2], inbox = ARGV[3], size = tonumber(ARGV[4]), ttl = ARGV[5]}
local mode, ntargets = ARGV[6], tonumber(ARGV[7])
local base = 7 + ntargets
local token, fp, recttl, epoch = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
if redis.call('GET', KEYS[3]) ~= epoch then return {'epoch', {}} end
local seen = redis.call('HMGET', KEYS[4], 'r', 'fp', 'id', 'to')
if seen[3] then
  if seen[1] == token then
    local went = {}
    for n in string.gmatch(seen[4] or '', '[^,]+') do table.insert(went, n) end
    return {'added', went, seen[3]}
  end
  if seen[2] ~= fp then return {'other', {}} end
  return {'busy', {}}
end
if seen[2] and seen[2] ~= fp then return {'other', {}} end  -- reserved for another notification (IDEM_RESERVE)
local to = route(KEYS[1], prefix, mode, 8, ntargets)
if #to == 0 and mode ~= 'keep' then return {'nobody', {}} end
if not here(prefix, mode, 8, ntargets, to) then return {'moving', {}} end
local fields = {}
for i = base + 5, #ARGV do table.insert(fields, ARGV[i]) end
local id = store(KEYS[2], prefix, limits, mode, 8, ntargets, fields, to)
redis.call('HSET', KEYS[4], 'r', token, 'fp', fp, 'id', id, 'to', table.concat(to, ','))
redis.call('PEXPIRE', KEYS[4], recttl)
return {'added', to, id}
"""
)

# A whole batch in one step, recorded like PUBLISH. KEYS: nodes, feed, epoch, the request's record.
# ARGV: prefix, feed maxlen, inbox maxlen, history size, index TTL in ms, the request's token, the key's
# fingerprint ('' without a key), the record's TTL in ms, the epoch the node knows, a '1' or '0' per item ('' for
# all '0'): '1' stores the item even when nobody is there (PUBLISH's modes `every` and `keep`), the number of
# items, then per item: its number of targets (0: everyone), the targets, its number of fields, the field, value
# pairs.
# Returns {outcome, {nodes per item, joined by commas}, marks}: outcome as PUBLISH's ('added', 'epoch', 'busy',
# 'other', 'moving'; never 'nobody': that is per item),
# marks one per item, in order, joined by commas: the entry's id,
# or '-' when none of its targets is connected (each item routed and stored as PUBLISH does). The record is
# written only when some item was stored; its 'id' is the first stored id (what IDEM_BEGIN dates it by), its
# 'ids' the marks after 'batch:' (what IDEM_BEGIN hands on for a batch that never answered), its 'tos' the
# nodes of each item (what a resend waits for).
PUBLISH_BATCH = (
    _LIVE
    + _ROUTE
    + """
local prefix = ARGV[1]
local limits = {feed = ARGV[2], inbox = ARGV[3], size = tonumber(ARGV[4]), ttl = ARGV[5]}
local token, fp, recttl, epoch, keeps = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local nitems = tonumber(ARGV[11])
if redis.call('GET', KEYS[3]) ~= epoch then return {'epoch', {}} end
local seen = redis.call('HMGET', KEYS[4], 'r', 'fp', 'id', 'ids', 'tos')
if seen[3] then
  if seen[1] == token and seen[4] then
    local tos = {}
    for t in string.gmatch(seen[5] or '', '([^;]*);') do table.insert(tos, t) end
    return {'added', tos, string.sub(seen[4], 7)}
  end
  if seen[2] ~= fp then return {'other', {}} end
  return {'busy', {}}
end
if seen[2] and seen[2] ~= fp then return {'other', {}} end  -- reserved for another notification (IDEM_RESERVE)
local everyone = {}  -- the broadcast route of each mode, found once per batch
local items = {}  -- every item routed, and its keys found here, before the first is stored
local i = 12
for n = 1, nitems do
  local keep = string.sub(keeps, n, n) == '1'
  local ntargets = tonumber(ARGV[i])
  local nfields = tonumber(ARGV[i + 1 + ntargets])
  local first = i + 2 + ntargets
  local mode, to = 'users', nil
  if ntargets == 0 then
    mode = keep and 'every' or 'all'
    everyone[mode] = everyone[mode] or route(KEYS[1], prefix, mode, 0, 0)
    to = everyone[mode]
  else
    if keep then mode = 'keep' end
    to = route(KEYS[1], prefix, mode, i + 1, ntargets)
  end
  local wanted = #to > 0 or keep
  if wanted and not here(prefix, mode, i + 1, ntargets, to) then return {'moving', {}} end
  table.insert(items, {wanted, mode, i + 1, ntargets, first, nfields, to})
  i = first + 2 * nfields
end
local marks, tos, first_id = {}, {}, nil
for _, item in ipairs(items) do
  local wanted, mode, at, ntargets, first, nfields, to = unpack(item)
  if wanted then
    local fields = {}
    for j = first, first + 2 * nfields - 1 do table.insert(fields, ARGV[j]) end
    local id = store(KEYS[2], prefix, limits, mode, at, ntargets, fields, to)
    first_id = first_id or id
    table.insert(marks, id)
  else
    table.insert(marks, '-')
  end
  table.insert(tos, table.concat(to, ','))
end
local joined = table.concat(marks, ',')
if first_id then
  redis.call('HSET', KEYS[4], 'r', token, 'fp', fp, 'id', first_id, 'ids', 'batch:' .. joined,
             'tos', table.concat(tos, ';') .. ';')
  redis.call('PEXPIRE', KEYS[4], recttl)
end
return {'added', tos, joined}
"""
)

# A node's heartbeat, refreshed by BEAT, and by JOIN when it finds it gone. A node whose heartbeat had expired
# was skipped by every publish meanwhile (scripts drop it from the routing index), so it must close its sockets
# before it delivers anything routed to it from now on. Redis says so in the node's own inbox: the step that
# brings the node back writes a `rejoin` mark there, with an id from the feed, after everything routed to the
# node before and before anything routed to it after; the reader meets it in order. Nothing depends on the
# node reading the script's answer, which a paused Redis may run after the node gave up waiting for it.
# `life:<node>` keeps the mark's id, so a socket that joined after the mark (JOIN returns it) is left open.
# No mark on the first beat of a process (`ever` '0': nothing of it to close), nor when Redis lost its data
# (another epoch than the node knows): the reader's repair closes every socket then.
# Returns the heartbeat's previous value (false: it had expired, or the node is new), the epoch, the mark.
_BEAT = """
local function beat(nodes, feed, epoch_key, heartbeat, prefix, me, value, ttl, known, limits, ever)
  local inbox, life = prefix .. 'inbox:' .. me, prefix .. 'life:' .. me
  local previous = redis.call('SET', heartbeat, value, 'PX', ttl, 'GET')
  redis.call('SADD', nodes, me)
  redis.call('PEXPIRE', prefix .. 'presence:' .. me, ttl)
  redis.call('PEXPIRE', inbox, ttl)  -- a node gone without a word leaves no inbox behind
  local epoch = redis.call('GET', epoch_key)
  local mark = false
  if not previous and ever == '1' and epoch and epoch == known then
    mark = redis.call('XADD', feed, 'MAXLEN', '~', limits.feed, '*', 'c', 'rejoin')
    redis.call('XADD', inbox, 'MAXLEN', '~', limits.inbox, mark, 'c', 'rejoin')
    redis.call('SET', life, mark, 'PX', ttl)
  else
    redis.call('PEXPIRE', life, ttl)
  end
  return previous, epoch, mark
end
"""

# KEYS: nodes, feed, epoch. ARGV: prefix, this node, user, this node's count of the user (the new socket
# included), limit, presence TTL in ms, the heartbeat's value, the epoch the node knows, the feed's and the
# inbox's maxlen. Returns {accepted 0/1, sockets of the user on other nodes, registered 0/1 (the heartbeat was
# there), the id of this node's last rejoin mark, or nil}. A heartbeat found gone is brought back here, with
# its mark (see _BEAT), so the new socket is routed to from now on and is not closed for that mark.
JOIN = (
    _LIVE
    + _BEAT
    + """
local prefix, me, user, mine, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local heartbeat = prefix .. 'node:' .. me
local registered = redis.call('EXISTS', heartbeat)
if registered == 0 then
  beat(KEYS[1], KEYS[2], KEYS[3], heartbeat, prefix, me, ARGV[7], ARGV[6], ARGV[8],
       {feed = ARGV[9], inbox = ARGV[10]}, '1')
end
local others = 0
for _, h in ipairs(holders(prefix, user)) do
  if h[1] ~= me then others = others + h[2] end
end
local life = redis.call('GET', prefix .. 'life:' .. me)
if others + mine > limit then return {0, others, registered, life} end
local key = prefix .. 'presence:' .. me
redis.call('HSET', key, user, mine)
redis.call('PEXPIRE', key, ARGV[6])
redis.call('HSET', prefix .. 'where:' .. user, me, mine)
return {1, others, registered, life}
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

# Stream ids compared as numbers (as strings "1700000000000-12" do not sort). Both parts fit a Lua double
# exactly for any id Redis hands out in this millennium.
_IDS = """
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
"""

# KEYS: nodes. ARGV: prefix, user. Returns the user's sockets summed over the live nodes that hold the user
# (presence query), from the user's index: its cost is the user's nodes, not the cluster's.
PRESENCE = (
    _LIVE
    + """
local total = 0
for _, h in ipairs(holders(ARGV[1], ARGV[2])) do total = total + h[2] end
return total
"""
)

# On Redis Cluster, before a batch spread over shards (backends/redis/sharded.py): whether anyone is connected
# to this shard's users, and whether each given user is. KEYS: nodes. ARGV: prefix, the users. Returns {anyone
# 0/1, then 0/1 per user}.
CONNECTED = (
    _LIVE
    + """
local prefix = ARGV[1]
local out = {0}
for _, n in ipairs(live_nodes(KEYS[1], prefix)) do
  if redis.call('HLEN', prefix .. 'presence:' .. n) > 0 then
    out[1] = 1
    break
  end
end
for i = 2, #ARGV do
  if #holders(prefix, ARGV[i]) > 0 then table.insert(out, 1) else table.insert(out, 0) end
end
return out
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

# This node's heartbeat (see _BEAT). KEYS: nodes, feed, epoch, this node's heartbeat. ARGV: prefix, this node,
# the heartbeat's value, its TTL in ms, the epoch the node knows, the feed's maxlen, the inbox's maxlen, 1 if
# this process has beaten before, else 0, and the newest id this node knows was stored (one it published and
# got an answer for, or one its reader delivered; '0-0' if none). Returns {the heartbeat's previous value (nil:
# it had expired, or the node is new), seconds, microseconds (Redis's TIME), the epoch, the id of the rejoin
# mark written now, or nil, 1 if the feed has lost entries this node knew were stored, else 0}.
# That loss is a failover to a replica that had not got the newest writes (replication is asynchronous): the
# epoch survives it, so REPAIR cannot tell. The id is gone from the feed though nothing trimmed it (a trim
# takes the oldest first): the feed is marked "deleted up to that id", so a `since` from before it resumes with
# `recovered: false` instead of silently missing what was lost, and new ids follow it.
BEAT = (
    _INFO
    + _IDS
    + _BEAT
    + """
local previous, epoch, mark = beat(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                                   ARGV[5], {feed = ARGV[6], inbox = ARGV[7]}, ARGV[8])
local lost = 0
local known = ARGV[9]
if epoch and epoch == ARGV[5] and known ~= '0-0' then
  local last, deleted = last_and_deleted(KEYS[2])
  -- Gone, and not by a trim (that takes the oldest first) nor already marked: lost.
  if #redis.call('XRANGE', KEYS[2], known, known) == 0 and later(known, deleted) ~= deleted then
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #first == 0 or later(known, first[1][1]) == known then
      redis.call('XSETID', KEYS[2], later(known, last), 'MAXDELETEDID', known)
      lost = 1
    end
  end
end
local t = redis.call('TIME')
return {previous, t[1], t[2], epoch, mark, lost}
"""
)

# KEYS: feed, epoch, this node's inbox. ARGV: the last id this reader saw ("0-0" if none). Run by every reader
# when it (re)connects. Returns {1 if the data was lost, the feed's last id, epoch, the newest id deleted from
# the inbox (trimmed before this reader got there) or, after a loss, from the feed}. The epoch names this
# Redis's data: a reader that finds another one than it knew has missed whatever the old data held.
# Without the epoch key this Redis has lost its data (a restart without persistence) or never had any: the
# stream is marked "everything up to now was deleted", so a `since` from before reads `recovered: false`.
# "Now" is the later of Redis's clock and the reader's last id, so new ids follow the old ones even if the
# restarted Redis's clock is behind.
REPAIR = (
    _INFO
    + _IDS
    + """
local known = redis.call('GET', KEYS[2])
if known then
  local last = last_and_deleted(KEYS[1])
  local trimmed = '0-0'
  if KEYS[3] then
    local _inbox_last, inbox_deleted = last_and_deleted(KEYS[3])
    trimmed = inbox_deleted
  end
  return {0, last, known, trimmed}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], 'diary-ws-init', '$', 'MKSTREAM')
  redis.call('XGROUP', 'DESTROY', KEYS[1], 'diary-ws-init')
end
local last = last_and_deleted(KEYS[1])
local top = later(later(last, ARGV[1]), string.format('%.0f', now) .. '-0')
redis.call('XSETID', KEYS[1], top, 'MAXDELETEDID', top)
local epoch = t[1] .. '.' .. t[2]
redis.call('SET', KEYS[2], epoch)
return {1, top, epoch, top}
"""
)

# The history window's state, for REPLAY and REPLAY_PAGE: Redis's TIME, the feed's last id, and the floor:
# the newest id outside the window (trimmed from the feed, pushed out by `size` newer messages, which the
# ring in PUBLISH remembers, or older than the TTL).
_WINDOW = """
local function window(feed, prefix, size, ttl)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local last, floor = last_and_deleted(feed)
  -- A trim (MAXLEN, or HISTORY_BYTES' XTRIM) does not move max-deleted-entry-id: a feed that has lost entries
  -- (entries-added over its length) has lost everything before its first entry.
  if redis.call('EXISTS', feed) == 1 then
    local info = redis.call('XINFO', 'STREAM', feed)
    local added, length, first = 0, 0, nil
    for i = 1, #info, 2 do
      if info[i] == 'entries-added' then added = info[i + 1] end
      if info[i] == 'length' then length = info[i + 1] end
      if info[i] == 'first-entry' and type(info[i + 1]) == 'table' then first = info[i + 1][1] end
    end
    if first and added > length then
      local ms, seq = parts(first)
      local before
      if seq > 0 then
        before = string.format('%.0f-%.0f', ms, seq - 1)
      else
        before = string.format('%.0f-18446744073709551615', ms - 1)
      end
      floor = later(floor, before)
    end
  end
  local seq = tonumber(redis.call('GET', prefix .. 'seq') or '0')
  if seq > size then
    local out = redis.call('HGET', prefix .. 'ring', (seq + 1) % (size + 1))
    if out then floor = later(floor, out) end
  end
  local cutoff = string.format('%.0f', now - tonumber(ttl))
  local old = redis.pcall('XREVRANGE', feed, '(' .. cutoff .. '-0', '-', 'COUNT', 1)
  if type(old) == 'table' and not old.err and #old > 0 then floor = later(floor, old[1][1]) end
  return t, last, floor
end
"""

# KEYS: feed. ARGV: prefix, user, since (an id), history size, history TTL in ms.
# Returns {seconds, microseconds, last id, floor, {entry, ...} oldest first}: the user's messages and the
# broadcasts after `since` and inside the window, found through the per-user and broadcast indexes (so the
# cost follows what is returned, not the history's size), with the floor: the newest id outside the window
# (trimmed from the feed, pushed out by `size` newer messages, or older than the TTL).
REPLAY = (
    _INFO
    + _IDS
    + _WINDOW
    + """
local prefix, user, since, size, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local t, last, floor = window(KEYS[1], prefix, size, ttl)
local ids = {}
for _, index in ipairs({prefix .. 'u:' .. user, prefix .. 'all'}) do
  local found = redis.pcall('XREVRANGE', index, '+', '(' .. since, 'COUNT', size)
  if type(found) == 'table' and not found.err then
    for _, e in ipairs(found) do
      if later(e[1], floor) ~= floor then table.insert(ids, e[1]) end
    end
  end
end
table.sort(ids, function(a, b) return a ~= b and later(a, b) == b end)
local entries = {}
for i = math.max(1, #ids - size + 1), #ids do
  local e = redis.call('XRANGE', KEYS[1], ids[i], ids[i])
  if #e > 0 then table.insert(entries, e[1]) end
end
return {t[1], t[2], last, floor, entries}
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
# still be answering) | {'stale', id, nodes} (stored, and the request that stored it never answered; nodes:
# how many it went to).
IDEM_BEGIN = """
local e = redis.call('HMGET', KEYS[1], 'fp', 'id', 'status', 'body', 'ids')
if not e[2] then return {'first'} end
if e[1] ~= ARGV[1] then return {'other'} end
if e[3] then return {'done', e[3], e[4]} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(string.match(e[2], '^(%d+)-'))
if now - ms < tonumber(ARGV[2]) then return {'busy'} end
local to = redis.call('HGET', KEYS[1], 'to')
if not to then return {'stale', e[5] or e[2], redis.call('SCARD', KEYS[2])} end
local went = 0
for _ in string.gmatch(to, '[^,]+') do went = went + 1 end
return {'stale', e[2], went}
"""

# On Redis Cluster, the Idempotency-Key's record of a message stored in several shards (or in a shard other
# than the key's own), written after them (backends/redis/sharded.py). KEYS: the key's record. ARGV: the
# request's token, the fingerprint, the first stored id, the record's TTL in ms, then for a batch its marks
# (a comma list, as PUBLISH_BATCH's) and its items' nodes (';' per item), or two empty strings. It names no
# nodes, so a retry that finds it without an answer counts every live node missing (IDEM_BEGIN). Only the
# first request to store a message under the key records it. Returns 1 if written.
IDEM_RECORD = """
if redis.call('HEXISTS', KEYS[1], 'id') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'fp', ARGV[2], 'id', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'ids', 'batch:' .. ARGV[5], 'tos', ARGV[6]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# On Redis Cluster, before a keyed message is stored in a shard other than its key's own or in several: the
# key is taken for this notification first, so two notifications under one key never both go out (the parts'
# records cannot see each other). KEYS: the key's record. ARGV: the fingerprint, this request's token, the busy
# window in ms, the record's TTL in ms. Returns 'ok' (the key is this request's: new, or taken by a request
# with the same notification that went quiet for longer than the busy window), 'other' (another notification
# holds it: 422) or 'busy' (a request with the same notification took it less than the busy window ago, or
# has stored it since this one asked IDEM_BEGIN: 409, as IDEM_BEGIN says on one Redis).
IDEM_RESERVE = """
local e = redis.call('HMGET', KEYS[1], 'fp', 'id', 'r', 'at')
if e[1] and e[1] ~= ARGV[1] then return 'other' end
if e[2] then return 'busy' end  -- stored by a request that began as this one did: IDEM_BEGIN answers a retry
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if e[3] and e[3] ~= ARGV[2] and now - tonumber(e[4] or '0') < tonumber(ARGV[3]) then return 'busy' end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'r', ARGV[2], 'at', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 'ok'
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

# One page of a replay, read forward through the same indexes. KEYS: the feed. ARGV: prefix, user, the id to
# read after, history size, history TTL in ms, the most messages to return. Returns {seconds, microseconds,
# last id, floor, {entry, ...} oldest first, 1 if the indexes hold more after the last one}: as REPLAY.
REPLAY_PAGE = (
    _INFO
    + _IDS
    + _WINDOW
    + """
local prefix, user, after, size, ttl, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local t, last, floor = window(KEYS[1], prefix, size, ttl)
local start = later(after, floor)
local ids, more = {}, 0
for _, index in ipairs({prefix .. 'u:' .. user, prefix .. 'all'}) do
  local found = redis.pcall('XRANGE', index, '(' .. start, '+', 'COUNT', count + 1)
  if type(found) == 'table' and not found.err then
    for _, e in ipairs(found) do table.insert(ids, e[1]) end
  end
end
table.sort(ids, function(a, b) return a ~= b and later(a, b) == b end)
if #ids > count then more = 1 end
local entries = {}
for i = 1, math.min(#ids, count) do
  local e = redis.call('XRANGE', KEYS[1], ids[i], ids[i])
  if #e > 0 then table.insert(entries, e[1]) end
end
return {t[1], t[2], last, floor, entries, more}
"""
)

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
    PUBLISH,
    PUBLISH_BATCH,
    JOIN,
    BEAT,
    STATUS,
    PRESENCE,
    CONNECTED,
    REPAIR,
    REPLAY,
    REPLAY_PAGE,
    TRIM_BYTES,
    RATE,
    IDEM_BEGIN,
    IDEM_RESERVE,
    IDEM_RECORD,
    IDEM_FINISH,
    IDEM_ABANDON,
)
