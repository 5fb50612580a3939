//! Settings, all under `cde.`: one static per setting, registered in `init()`, read through small
//! accessors. Invalid values are refused when set (ranges for numbers, a check hook for the URL).
//!
//! Documented in docs/settings.md.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::{CStr, CString};
use std::time::Duration;

pub static ENDPOINT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static API_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static API_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static MAX_BATCH_BYTES: GucSetting<i32> = GucSetting::<i32>::new(4 * 1024 * 1024);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static LEGACY_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static RETRY_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static HTTP_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static COMPRESSION: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static LOG_PAYLOADS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static PAUSE: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static SYNC_BUILDERS: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static SYNC_BUILDERS_SEND: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static TOMBSTONE_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);
pub static HISTORY_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(30 * 24 * 3600);

pub fn init() {
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"cde.endpoint",
            c"Base URL of the ingest endpoint (http or https); feeds are POSTed to {endpoint}/{feed}.",
            c"Empty means: collect into the feed tables, send nothing.",
            &ENDPOINT,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_endpoint),
            None,
            None,
        );
    }
    // The key itself is never shown: SHOW, current_setting() and pg_settings answer a mask to
    // everyone (GUC_SUPERUSER_ONLY alone admits pg_read_all_settings, hence pg_monitor). It may
    // only come from the server's configuration files: a value set per database or role would be
    // in pg_db_role_setting, a SET in pg_stat_activity. cde.api_key_file is the better place.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"cde.api_key",
            c"Bearer token sent in the Authorization header (prefer cde.api_key_file).",
            c"Only from postgresql.conf or ALTER SYSTEM, shown to nobody. A reload that changes it logs it, and ALTER SYSTEM keeps it in postgresql.auto.conf: a key kept in cde.api_key_file reaches neither.",
            &API_KEY,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            Some(check_api_key),
            None,
            Some(show_api_key),
        );
    }
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"cde.api_key_file",
            c"File holding the bearer token (used when cde.api_key is empty).",
            c"PostgreSQL logs a changed setting's value on reload; a key kept in a file never reaches the log.",
            &API_KEY_FILE,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY,
            Some(check_api_key_file),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"cde.database",
        c"Databases cde serves, comma-separated; empty: every database where cde is installed.",
        c"0.1.0 served only the one database named here (postgres by default); a name set here still limits cde to it.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    int(c"cde.batch_size", c"Most items in one request (a feed may set its own).", &BATCH_SIZE, 1, 100_000, GucFlags::default());
    int(
        c"cde.max_batch_bytes",
        c"Most bytes of JSON in one request body, before compression.",
        &MAX_BATCH_BYTES,
        1024,
        i32::MAX,
        GucFlags::UNIT_BYTE,
    );
    int(
        c"cde.poll_interval",
        c"How often the worker looks for work when no commit woke it.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucFlags::UNIT_MS,
    );
    int(
        c"cde.legacy_interval",
        c"How often pending rows of legacy-mode feeds are sent.",
        &LEGACY_INTERVAL_MS,
        100,
        i32::MAX,
        GucFlags::UNIT_MS,
    );
    int(
        c"cde.retry_interval",
        c"How long a failed item waits before it is sent again.",
        &RETRY_INTERVAL_MS,
        100,
        i32::MAX,
        GucFlags::UNIT_MS,
    );
    int(
        c"cde.max_attempts",
        c"Attempts after which a failing item is dead (0: unlimited).",
        &MAX_ATTEMPTS,
        0,
        1_000_000,
        GucFlags::default(),
    );
    int(
        c"cde.http_timeout",
        c"Timeout of one HTTP request, connect included.",
        &HTTP_TIMEOUT_MS,
        100,
        3_600_000,
        GucFlags::UNIT_MS,
    );
    int(
        c"cde.sync_builders",
        c"Sync builders a full sync phase is built by at once (0: the worker builds, between its sends).",
        &SYNC_BUILDERS,
        0,
        64,
        GucFlags::default(),
    );
    int(
        c"cde.tombstone_retention",
        c"How long a delivered deletion stays in its feed table (-1: for ever).",
        &TOMBSTONE_RETENTION_S,
        -1,
        i32::MAX,
        GucFlags::UNIT_S,
    );
    int(
        c"cde.history_retention",
        c"How long a full sync run that ended stays in cde_sync_runs, with its events (-1: for ever).",
        &HISTORY_RETENTION_S,
        -1,
        i32::MAX,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"cde.compression",
        c"gzip request bodies (Content-Encoding: gzip).",
        c"",
        &COMPRESSION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"cde.sync_builders_send",
        c"Sync builders send the documents they build themselves (off: they leave them pending for the worker).",
        c"Only to an immediate feed's destination that is neither held, failing nor rate limited; otherwise the worker sends.",
        &SYNC_BUILDERS_SEND,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"cde.pause",
        c"Pause the background worker: changes are still captured, nothing is collected or sent.",
        c"For maintenance windows; set it back and the worker catches up.",
        &PAUSE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"cde.log_payloads",
        c"Log request bodies, truncated, for debugging.",
        c"",
        &LOG_PAYLOADS,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
    );
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"cde".as_ptr())
    };
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(c"cde".as_ptr())
    };
}

fn int(name: &'static CStr, short: &'static CStr, setting: &'static GucSetting<i32>, min: i32, max: i32, flags: GucFlags) {
    GucRegistry::define_int_guc(name, short, c"", setting, min, max, GucContext::Suset, flags);
}

/// The endpoint must be an absolute http(s) URL, or empty.
pub fn validate_endpoint(url: &str) -> Result<(), &'static str> {
    if url.is_empty() {
        return Ok(());
    }
    let rest =
        url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).ok_or("must start with http:// or https://")?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        return Err("has no host");
    }
    if url.contains(char::is_whitespace) {
        return Err("contains white space");
    }
    if url.contains('?') || url.contains('#') {
        return Err("must not carry a query or fragment: feeds are appended as /{feed}");
    }
    if host.contains('@') {
        // Everyone may read cde.endpoint (SHOW, pg_settings, the log): no secret belongs in it.
        return Err("must not carry credentials (user:password@): put the key in cde.api_key_file");
    }
    Ok(())
}

/// Where a value of cde.api_key may come from: the server's configuration, nowhere readable by
/// other roles.
fn api_key_source_allowed(source: pg_sys::GucSource::Type) -> bool {
    use pg_sys::GucSource::*;
    matches!(source, PGC_S_DEFAULT | PGC_S_DYNAMIC_DEFAULT | PGC_S_ENV_VAR | PGC_S_FILE | PGC_S_ARGV)
}

#[pg_guard]
unsafe extern "C-unwind" fn check_api_key(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    let empty = unsafe { (*newval).is_null() || *(*newval) == 0 };
    if empty || api_key_source_allowed(source) {
        return true;
    }
    let msg = c"cde.api_key is only read from the server's configuration (postgresql.conf or ALTER SYSTEM): set per database, per role or per session it would be readable by other roles. Better: cde.api_key_file.";
    unsafe {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(msg.as_ptr());
    }
    false
}

/// Where the key comes from and where it goes are a superuser's to say, even for a role granted
/// SET on these parameters (PostgreSQL 15's GRANT SET ON PARAMETER): the superuser workers would
/// read any file the server can and send it to any endpoint. Checked when the value is given
/// (SET, ALTER DATABASE/ROLE ... SET); values already stored apply as they are.
fn given_by_non_superuser(source: pg_sys::GucSource::Type) -> bool {
    matches!(source, pg_sys::GucSource::PGC_S_TEST | pg_sys::GucSource::PGC_S_SESSION | pg_sys::GucSource::PGC_S_CLIENT)
        && unsafe { pg_sys::IsUnderPostmaster && pg_sys::IsTransactionState() && !pg_sys::superuser() }
}

fn refuse(msg: &CStr) -> bool {
    unsafe {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(msg.as_ptr());
    }
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn check_api_key_file(
    _newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    !given_by_non_superuser(source) || refuse(c"Only a superuser may set cde.api_key_file.")
}

#[pg_guard]
unsafe extern "C-unwind" fn show_api_key() -> *const std::ffi::c_char {
    if string(&API_KEY).is_some() { c"********".as_ptr() } else { c"".as_ptr() }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_endpoint(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    if given_by_non_superuser(source) {
        return refuse(c"Only a superuser may set cde.endpoint.");
    }
    let value = unsafe { (*newval).as_ref().map(|p| CStr::from_ptr(p).to_string_lossy().into_owned()) };
    match value.as_deref().map(validate_endpoint) {
        None | Some(Ok(())) => true,
        Some(Err(why)) => {
            // GUC_check_errdetail is a macro in C; setting the variables it sets does the same.
            let msg = CString::new(format!("cde.endpoint {why}.")).unwrap();
            unsafe {
                pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(msg.as_ptr());
            }
            false
        }
    }
}

fn string(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get().map(|c| c.to_string_lossy().into_owned()).filter(|s| !s.is_empty())
}

/// Plain values, read once per iteration (retry_interval and max_attempts are read by the SQL
/// that records outcomes, through current_setting()), on the main thread (GUCs must never be read elsewhere).
#[derive(Clone, Debug)]
pub struct Settings {
    pub endpoint: Option<String>,
    pub api_key: Option<String>,
    pub batch_size: usize,
    pub max_batch_bytes: usize,
    pub poll_interval: Duration,
    pub legacy_interval: Duration,
    pub retry_interval: Duration,
    pub http_timeout: Duration,
    pub compression: bool,
    pub log_payloads: bool,
    pub pause: bool,
    pub sync_builders: usize,
}

impl Settings {
    pub fn read() -> Settings {
        let ms = |s: &GucSetting<i32>| Duration::from_millis(s.get().max(0) as u64);
        Settings {
            endpoint: string(&ENDPOINT).map(|e| e.trim_end_matches('/').to_string()),
            api_key: api_key(),
            batch_size: BATCH_SIZE.get().max(1) as usize,
            max_batch_bytes: MAX_BATCH_BYTES.get().max(1024) as usize,
            poll_interval: ms(&POLL_INTERVAL_MS),
            legacy_interval: ms(&LEGACY_INTERVAL_MS),
            retry_interval: ms(&RETRY_INTERVAL_MS),
            http_timeout: ms(&HTTP_TIMEOUT_MS),
            compression: COMPRESSION.get(),
            log_payloads: LOG_PAYLOADS.get(),
            pause: PAUSE.get(),
            sync_builders: SYNC_BUILDERS.get().max(0) as usize,
        }
    }
}

/// The bearer key. A key file set for the database (ALTER DATABASE ... SET cde.api_key_file) is
/// that database's key and wins over cde.api_key, which is the whole server's; otherwise
/// cde.api_key, then cde.api_key_file. Read in a transaction (the setting's source is asked).
fn api_key() -> Option<String> {
    let file = string(&API_KEY_FILE);
    let for_database = file.is_some()
        && Spi::get_one::<bool>(
            "SELECT s.source OPERATOR(pg_catalog.=) ANY ('{database,user,database user}'::pg_catalog.text[])
               FROM pg_catalog.pg_settings s WHERE s.name OPERATOR(pg_catalog.=) 'cde.api_key_file'::pg_catalog.text",
        )
        .ok()
        .flatten()
        .unwrap_or(false);
    match (for_database, string(&API_KEY)) {
        (false, Some(key)) => Some(key),
        _ => file.and_then(read_key_file),
    }
}

/// The key file's first line. A file that cannot be read is reported (never its content) and
/// leaves the key unset, so that the endpoint answers 401 and the items wait, visible.
fn read_key_file(path: String) -> Option<String> {
    match std::fs::read_to_string(&path) {
        Ok(text) => text.lines().next().map(|l| l.trim().to_string()).filter(|k| !k.is_empty()),
        Err(e) => {
            pgrx::warning!("cde: CDE-206 cannot read cde.api_key_file {path}: {e}");
            None
        }
    }
}

/// The databases `cde.database` names, or `None` for every database where cde is installed.
pub fn databases() -> Option<Vec<String>> {
    let names: Vec<String> = string(&DATABASE)?.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
    (!names.is_empty()).then_some(names)
}
