//! What differs between the PostgreSQL versions cde builds for (15 to 18), in one place.

use pgrx::pg_sys;

/// The attributes of a tuple descriptor. PostgreSQL 18 puts `compact_attrs` first and the full
/// `FormData_pg_attribute` array right after them (what its `TupleDescAttr()` reads).
pub unsafe fn tupdesc_attrs<'a>(desc: pg_sys::TupleDesc) -> &'a [pg_sys::FormData_pg_attribute] {
    let natts = unsafe { (*desc).natts } as usize;
    #[cfg(not(feature = "pg18"))]
    unsafe {
        (*desc).attrs.as_slice(natts)
    }
    #[cfg(feature = "pg18")]
    unsafe {
        let first = (*desc).compact_attrs.as_ptr().add(natts).cast::<pg_sys::FormData_pg_attribute>();
        std::slice::from_raw_parts(first, natts)
    }
}

/// The sequence of an identity column (PostgreSQL 17 takes the open relation, not its oid).
pub unsafe fn identity_sequence(rel: pg_sys::Relation, attnum: pg_sys::AttrNumber) -> pg_sys::Oid {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    unsafe {
        pg_sys::getIdentitySequence((*rel).rd_id, attnum, true)
    }
    #[cfg(not(any(feature = "pg15", feature = "pg16")))]
    unsafe {
        pg_sys::getIdentitySequence(rel, attnum, true)
    }
}

/// Is this process a background worker? (PostgreSQL 17 dropped `IsBackgroundWorker`.)
pub fn is_background_worker() -> bool {
    unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BG_WORKER }
}

/// `proc_exit`, which pgrx's bindings for 18 do not declare as never returning.
pub fn proc_exit(code: i32) -> ! {
    unsafe { pg_sys::proc_exit(code) };
    #[allow(unreachable_code)]
    {
        unreachable!("proc_exit returned")
    }
}
