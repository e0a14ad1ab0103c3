//! The Lua scripts of the `switchboard.v1` inboxes (`inbox.rs` says what
//! the keys hold), and how they are called: `EVALSHA` after a `SCRIPT
//! LOAD` on first use and again after `NOSCRIPT` (a restarted Redis has
//! forgotten them), so a message carries 40 bytes of script name, not the
//! script. Each script touches the keys of one ID only (one slot of a
//! Redis Cluster).

use std::sync::Arc;

use super::conn::RedisConn;
use parking_lot::Mutex;

use super::Shared;

/// Numbers, stores and trims one message of one ID. Returns
/// `{epoch, seq, kept}`, or nil when the ID retains nothing.
const APPEND: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 's', 'b', 'u')
if not m[1] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(m[4] or 0) <= now then return false end
local seq = tonumber(m[2] or 0) + 1
local bytes = tonumber(m[3] or 0)
if redis.call('EXISTS', KEYS[2]) == 0 then bytes = 0 end
local size, maxb, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local len = string.len(ARGV[1])
local kept = 0
if len <= maxb then
  local f = {'p', ARGV[1], 't', now}
  if ARGV[6] ~= '' then f[#f + 1] = 'f'; f[#f + 1] = ARGV[6] end
  if ARGV[7] ~= '' then f[#f + 1] = 'm'; f[#f + 1] = ARGV[7] end
  if ARGV[8] == '1' then f[#f + 1] = 'b'; f[#f + 1] = '1' end
  redis.call('XADD', KEYS[2], string.format('%d-0', seq), unpack(f))
  bytes = bytes + len
  kept = 1
end
local n = redis.call('XLEN', KEYS[2])
while n > 0 do
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  local fields, flen, ft = first[2], 0, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'p' then flen = string.len(fields[i + 1])
    elseif fields[i] == 't' then ft = tonumber(fields[i + 1]) end
  end
  if n > size or bytes > maxb or ft + ttl <= now then
    redis.call('XDEL', KEYS[2], first[1])
    bytes = bytes - flen
    n = n - 1
  else
    break
  end
end
redis.call('HSET', KEYS[1], 's', seq, 'b', bytes)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if n > 0 then redis.call('PEXPIRE', KEYS[2], ttl) else redis.call('DEL', KEYS[2]) end
return {m[1], seq, kept}
";

/// A v1 connection attaches: creates the meta (new epoch, empty stream)
/// if there is none, retains until now + ARGV[2], and reads what a client
/// at (ARGV[4], ARGV[5]) missed. Returns `{epoch, top, now, entries}`.
const ATTACH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 's', 0, 'b', 0)
end
local until_ms = now + tonumber(ARGV[2])
if until_ms > tonumber(redis.call('HGET', KEYS[1], 'u') or 0) then
  redis.call('HSET', KEYS[1], 'u', until_ms)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local top = tonumber(redis.call('HGET', KEYS[1], 's') or 0)
local entries = {}
if ARGV[4] == e then
  local from = tonumber(ARGV[5])
  if from < top then
    entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', from + 1), string.format('%d-0', top))
  end
end
return {e, top, now, entries}
";

/// Reads the entries ARGV[1]..=ARGV[2]. Returns `{epoch, top, now,
/// entries}`, or nil when the ID has no inbox.
const READ: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local top = tonumber(redis.call('HGET', KEYS[1], 's') or 0)
return {e, top, now, redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', ARGV[2] .. '-0')}
";

/// A node still has v1 connections of the ID: retain until now + ARGV[1]
/// (never shortened). Returns `{epoch, top}`, or nil when the meta is
/// gone.
const TOUCH: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
if until_ms > tonumber(redis.call('HGET', KEYS[1], 'u') or 0) then
  redis.call('HSET', KEYS[1], 'u', until_ms)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {e, tonumber(redis.call('HGET', KEYS[1], 's') or 0)}
";

/// A node's last v1 connection of the ID ended: retain for ARGV[1] more
/// (a node that still has one refreshes it within a quarter of that).
const DETACH: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'u', now + tonumber(ARGV[1]))
return 1
";

/// The scripts, by their SHA1 once loaded.
#[derive(Default)]
pub(super) struct Scripts {
    shas: Mutex<Option<Arc<Shas>>>,
}

/// The SHA1 of each script, as `SCRIPT LOAD` answered.
pub(super) struct Shas {
    pub(super) append: String,
    pub(super) attach: String,
    pub(super) read: String,
    pub(super) touch: String,
    pub(super) detach: String,
}

impl Scripts {
    /// The loaded scripts, loading them if needed (or if `reload`).
    pub(super) async fn get(
        &self,
        conn: &mut RedisConn,
        reload: bool,
    ) -> Result<Arc<Shas>, ::redis::RedisError> {
        if !reload && let Some(shas) = self.shas.lock().clone() {
            return Ok(shas);
        }
        let (append, attach, read, touch, detach): (String, String, String, String, String) =
            ::redis::pipe()
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(APPEND)
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(ATTACH)
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(READ)
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(TOUCH)
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(DETACH)
                .query_async(conn)
                .await?;
        let shas = Arc::new(Shas {
            append,
            attach,
            read,
            touch,
            detach,
        });
        *self.shas.lock() = Some(Arc::clone(&shas));
        Ok(shas)
    }
}

/// Runs `build`'s pipeline of `EVALSHA`s, loading the scripts first if
/// needed and once more if Redis answers `NOSCRIPT`.
pub(super) async fn with_scripts<T: ::redis::FromRedisValue>(
    shared: &Shared,
    conn: &mut RedisConn,
    build: impl Fn(&Shas) -> ::redis::Pipeline,
) -> Result<T, ::redis::RedisError> {
    let shas = shared.scripts.get(conn, false).await?;
    match build(&shas).query_async(conn).await {
        Err(error) if error.kind() == ::redis::ErrorKind::NoScriptError => {
            let shas = shared.scripts.get(conn, true).await?;
            build(&shas).query_async(conn).await
        }
        other => other,
    }
}
