"""The job store's Lua scripts. Each change that touches more than one key is one script, so a crash or a concurrent
writer never leaves a half-made job, a wrong per-state count or an index that disagrees with a job's state.

State names, field names and the key prefix are filled in from `records` and `keys` (`$QUEUED` becomes `'queued'`,
`$PREFIX` the prefix), so no script spells a state of its own. Every lease check compares both the job's `attempt`
and its `executor_id` with the caller's: after Redis lost its last writes an attempt number can be handed out
twice, but never to the same executor.
"""

from __future__ import annotations

from string import Template

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from lorafleet.scheduler import keys
from lorafleet.scheduler.records import JobState


def run_pipelined(client: redis.Redis, calls: list[tuple[Script, list, list]]) -> list:
    """Each (script, keys, args) as an EVALSHA in one pipeline; the replies in order, an error as its exception.

    redis-py's own pipeline asks SCRIPT EXISTS before every pipeline that holds a script: a second round trip for
    each step an executor records. Here a script the server lacks (restarted, SCRIPT FLUSH) answers NOSCRIPT, which
    ran nothing: it is loaded and only those calls are sent again."""
    replies = _evalsha_pipeline(client, calls)
    missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {id(calls[index][0]): calls[index][0] for index in missing}.values():
            script.sha = client.script_load(script.script)
        for index, reply in zip(missing, _evalsha_pipeline(client, [calls[index] for index in missing])):
            replies[index] = reply
    return replies


def _evalsha_pipeline(client: redis.Redis, calls: list[tuple[Script, list, list]]) -> list:
    pipe = client.pipeline(transaction=False)
    for script, script_keys, args in calls:
        pipe.evalsha(script.sha, len(script_keys), *script_keys, *args)
    return pipe.execute(raise_on_error=False)


def _lua(source: str) -> str:
    names = {state.name: f"'{state.value}'" for state in JobState}
    return Template(source).substitute(names, PREFIX=keys.PREFIX)


# KEYS: tenant, tenant counts, job, tenant jobs, queue, queued set, global counts, events, submit sequence, requests,
#       queue changes, queue version.
# ARGV: job id, tenant, name, priority, spec JSON, now, datasets JSON, plan JSON, request id or ''.
# Returns {1, id, the job's hash} for a new job, {0, id, its hash} for the job an earlier submit with this request id
# made (read here, so that a submission is one round trip).
SUBMIT = _lua("""
if ARGV[9] ~= '' then
  local earlier = redis.call('HGET', KEYS[10], ARGV[9])
  if earlier then return {0, earlier, redis.call('HGETALL', '$PREFIX' .. 'job:' .. earlier)} end
end
local quota = redis.call('HMGET', KEYS[1], 'max_queued', 'disabled')
if not quota[1] then return redis.error_reply('NO_TENANT') end
if quota[2] == '1' then return redis.error_reply('DISABLED') end
local queued = tonumber(redis.call('HGET', KEYS[2], $QUEUED) or '0')
if queued >= tonumber(quota[1]) then return redis.error_reply('QUOTA ' .. queued .. ' ' .. quota[1]) end
if redis.call('EXISTS', KEYS[3]) == 1 then return redis.error_reply('JOB_EXISTS') end
local id, now = ARGV[1], ARGV[6]
local score = string.format('%d%014d', 9 - tonumber(ARGV[4]), redis.call('INCR', KEYS[9]))
redis.call('HSET', KEYS[3], 'job_id', id, 'tenant', ARGV[2], 'name', ARGV[3], 'state', $QUEUED,
  'priority', ARGV[4], 'spec', ARGV[5], 'submitted_at', now, 'updated_at', now, 'queue_score', score,
  'step', '0', 'total_steps', '0', 'metrics', '{}', 'attempt', '0', 'cancel_requested', '0', 'datasets', ARGV[7],
  'plan', ARGV[8], 'checkpoints', '[]', 'assigned_seq', '0', 'request_id', ARGV[9])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[10], ARGV[9], id) end
redis.call('ZADD', KEYS[4], now, id)
redis.call('ZADD', KEYS[5], score, id)
redis.call('ZADD', KEYS[11], redis.call('INCR', KEYS[12]), id)
redis.call('SADD', KEYS[6], id)
redis.call('HINCRBY', KEYS[2], $QUEUED, 1)
redis.call('HINCRBY', KEYS[7], $QUEUED, 1)
redis.call('XADD', KEYS[8], '*', 'type', 'state', 'ts', now,
  'data', cjson.encode({['from'] = cjson.null, to = $QUEUED}))
return {1, id, redis.call('HGETALL', KEYS[3])}
""")

# KEYS: job, global counts, queue, events, fence, finished, assignment sequence, queue changes, queue version.
# ARGV: from_states (comma separated), to, now, fence or '', attempt or '', executor or '', fields JSON,
#       a key that must exist or '' (a claim: the executor's heartbeat).
# Returns {1, from, attempt} when moved, {0, current state} when the job is elsewhere or the lease is not the caller's.
TRANSITION = _lua("""
local job = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'tenant', 'job_id', 'queue_score', 'executor_id',
  'pause_requested')
local cur = job[1]
if not cur then return redis.error_reply('NO_JOB') end
if ARGV[4] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[4] then return redis.error_reply('STALE_FENCE') end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then allowed = true end end
if not allowed or (ARGV[5] ~= '' and job[2] ~= ARGV[5]) or (ARGV[6] ~= '' and job[6] ~= ARGV[6]) then
  return {0, cur}
end
if ARGV[8] ~= '' and redis.call('EXISTS', ARGV[8]) == 0 then return {0, cur} end
local to, now, id, holder = ARGV[2], ARGV[3], job[4], job[6]
-- A pause asked for ends paused, whoever hands the job back (a drain, a lost executor): it never runs on unasked.
if to == $QUEUED and job[7] == '1' then to = $PAUSED end
local fields = cjson.decode(ARGV[7])
redis.call('HSET', KEYS[1], 'state', to, 'updated_at', now)
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
if (cur == $SCHEDULED or cur == $RUNNING) and to ~= $RUNNING and holder and holder ~= '' then
  redis.call('HDEL', '$PREFIX' .. 'executor:' .. holder .. ':holding', id)
  redis.call('SREM', '$PREFIX' .. 'executor:' .. holder .. ':pause', id)
end
if to == $PAUSED then redis.call('HSET', KEYS[1], 'pause_requested', '0', 'executor_id', '') end
local attempt = tonumber(job[2] or '0')
if to == $SCHEDULED then
  attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
  redis.call('HSET', KEYS[1], 'scheduled_at', now, 'assigned_seq', redis.call('INCR', KEYS[7]))
  redis.call('HSET', '$PREFIX' .. 'executor:' .. fields['executor_id'] .. ':holding', id, attempt)
elseif to == $RUNNING then
  redis.call('HSET', KEYS[1], 'started_at', now)
elseif to == $QUEUED then
  redis.call('HSET', KEYS[1], 'executor_id', '')
elseif to == $SUCCEEDED or to == $FAILED or to == $CANCELLED then
  redis.call('HSET', KEYS[1], 'finished_at', now)
  redis.call('ZADD', KEYS[6], now, id)
end
if to == $QUEUED then redis.call('ZADD', KEYS[3], job[5], id) else redis.call('ZREM', KEYS[3], id) end
if to == $QUEUED or cur == $QUEUED then redis.call('ZADD', KEYS[8], redis.call('INCR', KEYS[9]), id) end
redis.call('SMOVE', '$PREFIX' .. 'state:' .. cur, '$PREFIX' .. 'state:' .. to, id)
local tcounts = '$PREFIX' .. 'tenant:' .. job[3] .. ':counts'
redis.call('HINCRBY', tcounts, cur, -1)
redis.call('HINCRBY', tcounts, to, 1)
redis.call('HINCRBY', KEYS[2], cur, -1)
redis.call('HINCRBY', KEYS[2], to, 1)
fields['from'] = cur
fields['to'] = to
redis.call('XADD', KEYS[4], '*', 'type', 'state', 'ts', now, 'data', cjson.encode(fields))
return {1, cur, attempt}
""")

_LEASE_HELD = """
local job = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'executor_id')
if job[1] ~= $RUNNING or job[2] ~= ARGV[1] or (ARGV[2] ~= '' and job[3] ~= ARGV[2]) then return {0} end
"""

# KEYS: job, events. ARGV: attempt, executor or '', step, total_steps, metrics JSON, now, '1' to add an event, its data.
PROGRESS = _lua(_LEASE_HELD + """
redis.call('HSET', KEYS[1], 'step', ARGV[3], 'total_steps', ARGV[4], 'metrics', ARGV[5], 'updated_at', ARGV[6])
if ARGV[7] == '1' then
  redis.call('XADD', KEYS[2], '*', 'type', 'progress', 'ts', ARGV[6], 'data', ARGV[8])
end
return {1}
""")

# KEYS: job, events. ARGV: attempt, executor or '', checkpoint uri, now, checkpoints to keep, step.
# Returns {1, evicted uri, ...}: the caller (the lease holder) deletes those; {0} when refused.
CHECKPOINT = _lua(_LEASE_HELD + """
local kept = cjson.decode(redis.call('HGET', KEYS[1], 'checkpoints') or '[]')
table.insert(kept, ARGV[3])
local result = {1}
while #kept > tonumber(ARGV[5]) do table.insert(result, table.remove(kept, 1)) end
redis.call('HSET', KEYS[1], 'checkpoint_uri', ARGV[3], 'checkpoints', cjson.encode(kept), 'updated_at', ARGV[4])
redis.call('XADD', KEYS[2], '*', 'type', 'checkpoint', 'ts', ARGV[4],
  'data', cjson.encode({step = tonumber(ARGV[6]), checkpoint_uri = ARGV[3]}))
return result
""")

# KEYS: job, events, finished, global counts. ARGV: job id, finished before (unix s).
# Deletes a finished job's record, events and index entries; 1 if it did.
PURGE = _lua("""
local job = redis.call('HMGET', KEYS[1], 'state', 'tenant', 'finished_at', 'request_id')
if not job[1] then redis.call('ZREM', KEYS[3], ARGV[1]) return 0 end
if not (job[1] == $SUCCEEDED or job[1] == $FAILED or job[1] == $CANCELLED) then return 0 end
if tonumber(job[3] or '0') >= tonumber(ARGV[2]) then return 0 end
local tenant = '$PREFIX' .. 'tenant:' .. job[2]
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', '$PREFIX' .. 'state:' .. job[1], ARGV[1])
redis.call('HINCRBY', KEYS[4], job[1], -1)
redis.call('HINCRBY', tenant .. ':counts', job[1], -1)
redis.call('ZREM', tenant .. ':jobs', ARGV[1])
if job[4] and job[4] ~= '' then redis.call('HDEL', tenant .. ':requests', job[4]) end
return 1
""")

# KEYS: queue changes, queue, queue version, changes trimmed through. ARGV: the version the caller has read through.
# Returns {version now, id, '1' if it is queued now else '0', ...} for every job whose place in the queue changed
# since, and trims what it returned (only the leader reads it); {-1} when changes after ARGV[1] were trimmed by
# another reader: read the whole queue instead (`JobStore.queue_snapshot`).
QUEUE_CHANGES = _lua("""
if tonumber(redis.call('GET', KEYS[4]) or '0') > tonumber(ARGV[1]) then return {-1} end
local now = redis.call('GET', KEYS[3]) or '0'
local out = {now}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], now)) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('ZSCORE', KEYS[2], id) and '1' or '0'
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('SET', KEYS[4], now)
return out
""")

# KEYS: job, events. ARGV: now.
# Asks the running job's executor to pause it: {1} when asked (or asked before), {0, state} when it is not running.
# KEYS: job, its events. ARGV: tenant, now. Marks a succeeded job's fine-tuned model deleted, once: {1} when this call
# did, {0, why} otherwise ('' no such job of the tenant, 'deleted' already, or the job's state).
DELETE_MODEL = _lua("""
local job = redis.call('HMGET', KEYS[1], 'tenant', 'state', 'model_deleted_at')
if job[1] ~= ARGV[1] then return {0, ''} end
if job[3] then return {0, 'deleted'} end
if job[2] ~= $SUCCEEDED then return {0, job[2]} end
redis.call('HSET', KEYS[1], 'model_deleted_at', ARGV[2], 'updated_at', ARGV[2])
redis.call('XADD', KEYS[2], '*', 'type', 'model_deleted', 'ts', ARGV[2], 'data', '{}')
return {1}
""")

REQUEST_PAUSE = _lua("""
local job = redis.call('HMGET', KEYS[1], 'state', 'executor_id', 'pause_requested', 'job_id')
if job[1] ~= $RUNNING then return {0, job[1] or ''} end
if job[3] == '1' then return {1} end
redis.call('HSET', KEYS[1], 'pause_requested', '1', 'updated_at', ARGV[1])
redis.call('SADD', '$PREFIX' .. 'executor:' .. job[2] .. ':pause', job[4])
redis.call('XADD', KEYS[2], '*', 'type', 'pause_requested', 'ts', ARGV[1], 'data', '{}')
return {1}
""")
