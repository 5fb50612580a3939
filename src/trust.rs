//! Who runs what: SQL written by a role that is not a superuser runs with that role's rights,
//! never with the workers' (docs/security.md).
//!
//! The workers, and the SECURITY DEFINER functions of the SQL API, run as the extension's owner,
//! a superuser. A feed's source query and a tracking's keys are text that a delegated admin wrote.
//! They run only through [`as_role`]: the user id is switched to the feed's owner for the call, as
//! PostgreSQL itself does to evaluate a table owner's index expressions (`REFRESH MATERIALIZED
//! VIEW`, `VACUUM`, `CREATE INDEX`): a security-restricted operation (no SET ROLE, no temporary
//! objects, nothing that outlives the call), with a GUC nesting level so that any setting the code
//! changes (`set_config(..., false)` included) is undone when it returns. An error unwinds both
//! through the (sub)transaction's abort, which restores the user id and the settings it saved.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CString;

/// The settings that a key's text form depends on, fixed for every source query and every
/// tracking's keys: the writer's session (capture) and the worker's (rebuild) turn the same value
/// into the same key, whatever DateStyle, TimeZone... either has. Documents are rendered under
/// them too: a timestamp with time zone is sent in UTC.
const KEY_SETTINGS: [(&std::ffi::CStr, &std::ffi::CStr); 6] = [
    (c"DateStyle", c"ISO, YMD"),
    (c"TimeZone", c"UTC"),
    (c"IntervalStyle", c"postgres"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
    (c"lc_monetary", c"C"),
];

/// Run `f` as `role`, restricted, with `search_path` (if given) and [`KEY_SETTINGS`] for its
/// duration.
pub fn as_role<R>(role: pg_sys::Oid, search_path: Option<&str>, f: impl FnOnce() -> R) -> R {
    let path = search_path.map(|p| CString::new(p).unwrap_or_else(|_| error!("cde: a search_path holds a NUL byte")));
    unsafe {
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_context = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(role, saved_context | pg_sys::SECURITY_RESTRICTED_OPERATION as i32);
        let nest = pg_sys::NewGUCNestLevel();
        if let Some(p) = &path {
            set_for_now(c"search_path", p);
        }
        for (name, value) in KEY_SETTINGS {
            set_for_now(name, value);
        }
        let r = f();
        pg_sys::AtEOXact_GUC(false, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
        r
    }
}

/// Run `f` as the extension's owner, with a fixed search_path: what a SECURITY DEFINER function
/// of the SQL API does, for `CALL cde_deliver()` (src/api.rs), a procedure that commits and so may
/// not be SECURITY DEFINER. SET ROLE is refused meanwhile.
pub fn as_extension_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_context = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(owner, saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        let nest = pg_sys::NewGUCNestLevel();
        set_for_now(c"search_path", c"pg_catalog, pg_temp");
        let r = f();
        pg_sys::AtEOXact_GUC(true, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
        r
    }
}

/// Set a setting until the GUC nesting level in force is left (GUC_ACTION_SAVE, as a function's
/// SET clause does).
fn set_for_now(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}

/// Is this role still there? A feed outlives nothing: its owner may have been dropped.
fn role_exists(role: pg_sys::Oid) -> bool {
    Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE oid = $1)", &[role.into()])
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn require_role(role: pg_sys::Oid, what: &str) {
    if !role_exists(role) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("cde: the role that owns {what} (oid {}) no longer exists", role.to_u32()),
            "A superuser re-registers the feed (cde_register_feed) to give it an owner again."
        );
    }
}

/// Tickets: who called a management function. Inside a SECURITY DEFINER function
/// `current_user` is the function's owner, and the outer user (SET ROLE's, or the session's) may be
/// another role than the one whose code made the call: a superuser's write firing an admin's
/// trigger, the worker running an admin's source query. So each management function takes, as a
/// last argument defaulted to `cde._ticket()`, a ticket that the call's own expression takes in
/// the caller's context (a default is evaluated there, before the function switches user), bound to
/// `current_user` at that moment; its first statement redeems it (`cde._redeem`). A ticket is random,
/// of this backend only, single-use, and forgotten at the end of the transaction: a role can only
/// ever hold tickets of its own.
static TICKETS: std::sync::Mutex<Vec<(i64, pg_sys::Oid)>> = std::sync::Mutex::new(Vec::new());

/// Forget the tickets not redeemed (the call that took one failed before its first statement).
pub fn forget_tickets() {
    TICKETS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

#[pg_schema]
mod cde {
    use super::*;

    /// A ticket bound to `current_user` (see [`super::TICKETS`]). Refused where the current user
    /// is not the one acting on its own behalf: inside a security-restricted operation (a source
    /// query, a tracking's keys, an index expression).
    #[pg_extern(volatile, parallel_unsafe)]
    fn _ticket() -> i64 {
        if unsafe { pg_sys::InSecurityRestrictedOperation() } {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                "cde: cde's management functions cannot be called from a source query, a tracking's keys or another security-restricted operation"
            );
        }
        let mut bytes = [0u8; 8];
        if !unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) } {
            error!("cde: no random bytes for a ticket");
        }
        let ticket = i64::from_ne_bytes(bytes);
        let mut tickets = TICKETS.lock().unwrap_or_else(|e| e.into_inner());
        // Each call redeems its ticket at once: more outstanding than this is no management call.
        if tickets.len() >= 64 {
            drop(tickets);
            error!("cde: too many tickets outstanding in this transaction (cde._ticket() is for the management functions' default argument)");
        }
        tickets.push((ticket, unsafe { pg_sys::GetUserId() }));
        ticket
    }

    /// The role a ticket was taken by; the ticket is spent.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _redeem(ticket: Option<i64>) -> pg_sys::Oid {
        let mut tickets = TICKETS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = ticket.and_then(|t| tickets.iter().position(|(k, _)| *k == t)) {
            return tickets.swap_remove(i).1;
        }
        drop(tickets);
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "cde: call cde's management functions without their last argument",
            "It is a ticket that the call takes by itself (cde._ticket())."
        );
    }

    /// Run `query` as `role` with `search_path`; the first column of its first row, in its text
    /// form, whatever its type. For checks: a source query at registration, a tracking's keys.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _query_as(role: pg_sys::Oid, search_path: &str, query: &str) -> Option<String> {
        first_value_as(role, search_path, query, None)
    }

    /// The same for a query with one parameter, `$1 text[]`, bound (never spliced into the
    /// text): cde_check_feed's EXPLAIN of a rebuild of these keys.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _explain_as(role: pg_sys::Oid, search_path: &str, query: &str, keys: Vec<String>) -> Option<String> {
        first_value_as(role, search_path, query, Some(keys))
    }
}

fn first_value_as(role: pg_sys::Oid, search_path: &str, query: &str, keys: Option<Vec<String>>) -> Option<String> {
    use pgrx::IntoDatum;
    require_role(role, "this feed");
    let sql = CString::new(query).unwrap_or_else(|_| error!("cde: a query holds a NUL byte"));
    as_role(role, Some(search_path), || unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("cde._query_as: SPI_connect failed");
        }
        // Read-only, as a source query runs when it builds (cde._source): a query that locks or
        // writes rows is refused at registration, not at its first build.
        let rc = match keys {
            None => pg_sys::SPI_execute(sql.as_ptr(), true, 1),
            Some(keys) => {
                let mut types = [pg_sys::TEXTARRAYOID];
                let mut values = [keys.into_datum().unwrap_or(pg_sys::Datum::from(0usize))];
                let nulls = [b' ' as std::ffi::c_char];
                pg_sys::SPI_execute_with_args(sql.as_ptr(), 1, types.as_mut_ptr(), values.as_mut_ptr(), nulls.as_ptr(), false, 1)
            }
        };
        if rc < 0 {
            error!("cde._query_as: the query was refused (SPI code {rc})");
        }
        let table = pg_sys::SPI_tuptable;
        let value = if table.is_null() || pg_sys::SPI_processed == 0 {
            None
        } else {
            let v = pg_sys::SPI_getvalue(*(*table).vals, (*table).tupdesc, 1);
            (!v.is_null()).then(|| std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
        };
        pg_sys::SPI_finish();
        value
    })
}

/// `cde._source(feed, mode, keys, after, n, lane, lanes) RETURNS TABLE (key text, doc jsonb, o
/// bigint)` (declared in sql/rebuild.sql): a feed's source query in the shape `mode` needs
/// (`cde._source_sql`), run as the feed's owner with the feed's search_path. Every path that runs
/// a source query comes here: collect, full sync (count, chunks, deletion pass, dry runs), resync.
/// Its rows go into the caller's tuplestore (a materialized set), so that the statement around it
/// (cde._rebuild, which writes the feed table) runs as the extension's owner again.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_cde_source() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cde_source(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
    unsafe {
        let feed: String = pg_getarg::<&str>(fcinfo, 0).unwrap_or_else(|| error!("cde._source: feed is NULL")).to_string();
        let mut mode: String = pg_getarg::<&str>(fcinfo, 1).unwrap_or_else(|| error!("cde._source: mode is NULL")).to_string();
        if mode == "keys" && pg_arg_is_null(fcinfo, 2) {
            mode = "all".into(); // no keys given: every key, with no filter for the planner to keep
        }
        let (owner, path, query) = Spi::connect(|c| {
            let r = c
                .select(
                    "SELECT f.owner::oid, f.search_path, cde._source_sql(f, $2) FROM cde.feeds f WHERE f.name = $1",
                    Some(1),
                    &[feed.as_str().into(), mode.as_str().into()],
                )?;
            if r.is_empty() {
                return Ok(None);
            }
            let r = r.first();
            Ok::<_, pgrx::spi::SpiError>(Some((r.get::<pg_sys::Oid>(1)?, r.get::<String>(2)?, r.get::<String>(3)?)))
        })
        .unwrap_or_else(|e| error!("cde: {e}"))
        .unwrap_or_else(|| {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("cde: unknown feed {feed}"));
        });
        let (Some(owner), Some(path), Some(query)) = (owner, path, query) else {
            error!("cde._source: feed {feed} has no owner, search_path or query for mode {mode}")
        };
        require_role(owner, &format!("feed {feed}"));

        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        let store = (*rsinfo).setResult;
        // The query's parameters are the call's arguments after feed and mode, as they are.
        let mut types = [pg_sys::TEXTARRAYOID, pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::INT4OID, pg_sys::INT4OID];
        let mut values = [pg_sys::Datum::from(0usize); 5];
        let mut nulls = [b' ' as std::ffi::c_char; 5];
        for i in 0..5 {
            values[i] = pg_getarg_datum_raw(fcinfo, i + 2);
            if pg_arg_is_null(fcinfo, i + 2) {
                nulls[i] = b'n' as std::ffi::c_char;
            }
        }
        let sql = CString::new(query).unwrap_or_else(|_| error!("cde: the source query of feed {feed} holds a NUL byte"));
        as_role(owner, Some(&path), || {
            if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
                error!("cde._source: SPI_connect failed");
            }
            // Read-only: in the calling statement's snapshot, not a newer one of its own. The
            // rebuild compares the rows it overwrites against that snapshot (cde._unseen).
            let rc = pg_sys::SPI_execute_with_args(
                sql.as_ptr(),
                5,
                types.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                true,
                0,
            );
            if rc != pg_sys::SPI_OK_SELECT as i32 {
                error!("cde._source: the source query of feed {feed} did not return rows (SPI code {rc})");
            }
            let table = pg_sys::SPI_tuptable;
            // The rows go into a tuplestore of (text, jsonb, bigint): refuse anything else (a
            // source query's own types, shadowing pg_catalog's, must never be read as these).
            let desc = (*table).tupdesc;
            let want = [pg_sys::TEXTOID, pg_sys::JSONBOID, pg_sys::INT8OID];
            let attrs = crate::compat::tupdesc_attrs(desc);
            if attrs.len() != 3 || attrs.iter().zip(want).any(|(a, t)| a.atttypid != t) {
                error!("cde._source: the source query of feed {feed} did not give (text, jsonb, bigint) rows");
            }
            for i in 0..pg_sys::SPI_processed as usize {
                pg_sys::tuplestore_puttuple(store, *(*table).vals.add(i));
            }
            pg_sys::SPI_finish();
        });
        pg_sys::Datum::from(0usize)
    }
}
