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

/// Run `f` as `role`, restricted, with `search_path` (if given) for its duration.
pub fn as_role<R>(role: pg_sys::Oid, search_path: Option<&str>, f: impl FnOnce() -> R) -> R {
    let path = search_path.map(|p| CString::new(p).unwrap_or_else(|_| error!("cde: a search_path holds a NUL byte")));
    unsafe {
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_context = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(role, saved_context | pg_sys::SECURITY_RESTRICTED_OPERATION as i32);
        let nest = pg_sys::NewGUCNestLevel();
        if let Some(p) = &path {
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                p.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        let r = f();
        pg_sys::AtEOXact_GUC(false, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
        r
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

#[pg_schema]
mod cde {
    use super::*;

    /// The role acting: SET ROLE's role, or the session's user. Inside a SECURITY DEFINER
    /// function `current_user` is the function's owner; this is the role that called it.
    #[pg_extern(stable, parallel_safe)]
    fn _caller() -> pg_sys::Oid {
        unsafe { pg_sys::GetOuterUserId() }
    }

    /// True only inside [`super::as_role`] (a security-restricted operation). The generated
    /// rebuild functions refuse to run otherwise: called directly by a superuser, the source
    /// query would run with a superuser's rights.
    #[pg_extern(stable, parallel_safe)]
    fn _restricted() -> bool {
        unsafe { pg_sys::InSecurityRestrictedOperation() }
    }

    /// Run `query` as `role` with `search_path`; the first column of its first row, as text.
    /// For checks: a source query at registration, a tracking's keys.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _query_as(role: pg_sys::Oid, search_path: &str, query: &str) -> Option<String> {
        require_role(role, "this feed");
        as_role(role, Some(search_path), || {
            Spi::connect_mut(|c| {
                let rows = c.update(query, Some(1), &[])?;
                if rows.is_empty() {
                    return Ok::<_, pgrx::spi::SpiError>(None);
                }
                rows.first().get::<String>(1)
            })
            .unwrap_or_else(|e| error!("cde: {e}"))
        })
    }

    /// Rebuild documents of a feed: its generated function `cde.rebuild_<feed>` (sql/feeds.sql)
    /// called as the feed's owner. Every path that runs a source query comes here: collect,
    /// full sync (count, chunks, deletion pass, dry runs), resync.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)]
    fn _rebuild(
        feed: &str,
        keys: Option<Vec<Option<String>>>,
        mode: default!(&str, "'apply'"),
        after: default!(Option<&str>, "NULL"),
        n: default!(i32, 0),
        lane: default!(i32, 0),
        lanes: default!(i32, 1),
    ) -> TableIterator<
        'static,
        (name!(built, Option<i64>), name!(changed, Option<i64>), name!(deleted, Option<i64>), name!(last_key, Option<String>)),
    > {
        let (owner, function) = Spi::get_two_with_args::<pg_sys::Oid, String>(
            "SELECT f.owner::oid, f.rebuild_fn::regproc::text FROM cde.feeds f WHERE f.name = $1",
            &[feed.into()],
        )
        .unwrap_or_else(|e| error!("cde: {e}"));
        let (Some(owner), Some(function)) = (owner, function) else {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("cde: unknown feed {feed}"));
        };
        require_role(owner, &format!("feed {feed}"));
        let row = as_role(owner, None, || {
            Spi::connect_mut(|c| {
                let q = format!("SELECT built, changed, deleted, last_key FROM {function}($1, $2, $3, $4, $5, $6)");
                let r = c.update(&q, Some(1), &[keys.into(), mode.into(), after.into(), n.into(), lane.into(), lanes.into()])?.first();
                Ok::<_, pgrx::spi::SpiError>((r.get::<i64>(1)?, r.get::<i64>(2)?, r.get::<i64>(3)?, r.get::<String>(4)?))
            })
            .unwrap_or_else(|e| error!("cde: {e}"))
        });
        TableIterator::once(row)
    }
}
