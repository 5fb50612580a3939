//! Statements that need a database with no other session in it, never refused because of cde.
//!
//! DROP DATABASE (which waits 5 s for other sessions, then fails), ALTER DATABASE ... RENAME TO
//! and SET TABLESPACE, and CREATE DATABASE ... TEMPLATE (which fail at once) would otherwise meet
//! the database's cde worker and builders. Before such a statement runs, this hook holds the
//! database in shared memory (the launcher starts nothing there meanwhile, and a worker that was
//! connecting leaves as soon as it sees the hold), stops cde's processes in it and waits for them
//! to end; the hold goes when the statement ends, whether it succeeded or failed, and a
//! surviving database is served again at once. Only the database's owner (or a superuser) holds
//! it: anyone else's statement fails on its own, with cde's worker untouched.

use crate::shmem;
use pgrx::prelude::*;
use pgrx::PgList;
use std::ffi::CStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Longest wait for cde's processes to end (a worker leaves at once, even from a request in
/// flight; a builder after its current chunk).
const STOP_DEADLINE: Duration = Duration::from_secs(30);

static mut PREVIOUS: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    unsafe {
        PREVIOUS = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let run = || unsafe {
        match PREVIOUS {
            Some(previous) => previous(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, env, dest, qc),
        }
    };
    let hold = unsafe { needed_database((*pstmt).utilityStmt) }.and_then(|name| hold(&name));
    match hold {
        // The hold is released when the statement ends, an ERROR included (unwinding drops it).
        Some(hold) => {
            let mut hold = Some(hold);
            PgTryBuilder::new(run).finally(move || drop(hold.take())).execute()
        }
        None => run(),
    }
}

/// The database a statement needs to itself, if any.
unsafe fn needed_database(node: *mut pg_sys::Node) -> Option<String> {
    let text = |p: *const std::ffi::c_char| (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
    let option = |options: *mut pg_sys::List, name: &str| {
        let options = unsafe { PgList::<pg_sys::DefElem>::from_pg(options) };
        let found = options.iter_ptr().find_map(|d| unsafe {
            (CStr::from_ptr((*d).defname).to_bytes() == name.as_bytes() && !(*d).arg.is_null()).then(|| text(pg_sys::defGetString(d))).flatten()
        });
        found
    };
    if node.is_null() {
        return None;
    }
    match unsafe { (*node).type_ } {
        pg_sys::NodeTag::T_DropdbStmt => text(unsafe { (*node.cast::<pg_sys::DropdbStmt>()).dbname }),
        pg_sys::NodeTag::T_CreatedbStmt => option(unsafe { (*node.cast::<pg_sys::CreatedbStmt>()).options }, "template"),
        pg_sys::NodeTag::T_AlterDatabaseStmt => {
            let stmt = unsafe { &*node.cast::<pg_sys::AlterDatabaseStmt>() };
            option(stmt.options, "tablespace").and_then(|_| text(stmt.dbname))
        }
        pg_sys::NodeTag::T_RenameStmt => {
            let stmt = unsafe { &*node.cast::<pg_sys::RenameStmt>() };
            (stmt.renameType == pg_sys::ObjectType::OBJECT_DATABASE).then(|| text(stmt.subname)).flatten()
        }
        _ => None,
    }
}

/// Hold database `name` and stop cde's processes in it, if it is served and the caller owns it.
fn hold(name: &str) -> Option<shmem::Hold> {
    let cname = std::ffi::CString::new(name).ok()?;
    let oid = unsafe { pg_sys::get_database_oid(cname.as_ptr(), true) };
    if oid == pg_sys::Oid::INVALID || !owns(oid) {
        return None;
    }
    // The hold first: from here on the launcher starts nothing there, and a worker that was just
    // starting (no slot yet, or not yet connected) leaves once connected.
    let hold = shmem::hold(oid)?;
    let Some(slot) = shmem::slot_of(oid) else { return Some(hold) };
    let deadline = Instant::now() + STOP_DEADLINE;
    let mut told = false;
    loop {
        let pids: Vec<i32> = std::iter::once(&slot.pid)
            .chain(slot.builders.iter())
            .map(|p| p.load(Ordering::Acquire))
            .filter(|&p| shmem::alive(p))
            .collect();
        if pids.is_empty() || slot.database.load(Ordering::Acquire) != oid.to_u32() {
            break;
        }
        if !told {
            log!("cde: stopping cde's processes in database {name} for this statement");
            told = true;
        }
        for pid in pids {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if Instant::now() > deadline {
            warning!("cde: cde's processes in database {name} did not stop within {}s", STOP_DEADLINE.as_secs());
            break;
        }
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                10,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pg_sys::check_for_interrupts!();
    }
    Some(hold)
}

/// Does the current user own the database (or is a superuser)? The same test the statements
/// make themselves.
fn owns(database: pg_sys::Oid) -> bool {
    unsafe {
        if pg_sys::superuser() {
            return true;
        }
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::DATABASEOID as _, pg_sys::Datum::from(database));
        if tuple.is_null() {
            return false;
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple)).datdba;
        pg_sys::ReleaseSysCache(tuple);
        pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner)
    }
}
