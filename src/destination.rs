//! Destinations: where a feed's documents go (cde_set_destination), with what credentials,
//! signed or not, within which limits. `default` is the server's: cde.endpoint and its key.
//!
//! The worker keeps one [`Destination`] per row of cde.destinations, read again when the row
//! changed (cde_set_destination) or the settings were reloaded; the secret files are read then,
//! by the server's OS user, and never leave the worker's memory but as headers.

use crate::gucs::Settings;
use cde_protocol::destination::{self as options, Options};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DEFAULT: &str = "default";

/// Everything needed to send to one destination, as of one read: handed to its sender thread
/// with each slice, so the thread never reads settings or the catalog.
#[derive(Debug, Clone)]
pub struct Destination {
    pub name: String,
    pub endpoint: Option<String>,
    pub api_key: Option<String>,
    /// Standard Webhooks secrets: every request is signed with each (two while rotating).
    pub secrets: Vec<Vec<u8>>,
    /// Least time between two request starts (max_requests_per_second).
    pub spacing: Option<Duration>,
    pub batch_size: usize,
    pub max_batch_bytes: usize,
    pub timeout: Duration,
    pub compression: bool,
    pub headers: Vec<(String, String)>,
    pub response_id_header: String,
    pub log_payloads: bool,
    /// Why nothing may be sent to it now (a secret file that cannot be read): state `failing`.
    pub problem: Option<String>,
    /// The same, naming the file, for the server log.
    problem_log: Option<String>,
    /// 410 Gone disabled it: nothing is sent until cde_set_destination (a reload for `default`).
    pub disabled: bool,
    /// The row's updated_at, to know when to read it again.
    version: String,
    read_at: Instant,
}

impl Destination {
    /// May a slice be sent to it now (besides a hold, which the worker keeps)?
    pub fn sendable(&self) -> bool {
        self.endpoint.is_some() && self.problem.is_none() && !self.disabled
    }
}

/// The destinations of this database, read from cde.destinations.
#[derive(Default)]
pub struct Destinations {
    by_name: HashMap<String, Arc<Destination>>,
}

/// How often a destination whose secret file could not be read tries again (besides a reload).
const PROBLEM_RETRY: Duration = Duration::from_secs(10);

impl Destinations {
    pub fn get(&self, name: &str) -> Option<Arc<Destination>> {
        self.by_name.get(name).cloned()
    }

    /// Read the rows (in a transaction); a destination whose row changed, or all of them when
    /// `reread` (a reload), is built again, its files read again. Returns the problems found on
    /// this read (destination, message), already recorded on its row, for the worker's log, and
    /// the destinations set again since the last read (cde_set_destination): their holds end.
    pub fn refresh(&mut self, settings: &Settings, reread: bool) -> Refreshed {
        let rows = Spi::connect(|c| {
            let rows = c.select(
                "SELECT name, endpoint, options::text, disabled_at IS NOT NULL, updated_at::text FROM cde.destinations",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in rows {
                out.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?,
                    r.get::<String>(3)?.unwrap_or_else(|| "{}".into()),
                    r.get::<bool>(4)?.unwrap_or(false),
                    r.get::<String>(5)?.unwrap_or_default(),
                ));
            }
            Ok::<_, pgrx::spi::SpiError>(out)
        })
        .unwrap_or_else(|e| error!("cde: cannot read cde.destinations: {e}"));
        let mut problems: Vec<(String, String, String)> = Vec::new();
        let mut set_again = Vec::new();
        let mut next = HashMap::new();
        for (name, endpoint, opts, disabled, version) in rows {
            let keep = self.by_name.get(&name).filter(|d| {
                !reread
                    && d.version == version
                    && d.disabled == disabled
                    && (d.problem.is_none() || d.read_at.elapsed() < PROBLEM_RETRY)
            });
            if self.by_name.get(&name).is_some_and(|d| d.version != version) {
                set_again.push(name.clone());
            }
            let d = match keep {
                Some(d) => Arc::clone(d),
                None => {
                    let d = build(settings, &name, endpoint, &opts, disabled, version);
                    if let (Some(p), Some(log)) = (&d.problem, &d.problem_log) {
                        let was = self.by_name.get(&name).and_then(|old| old.problem.clone());
                        if was.as_deref() != Some(p) {
                            problems.push((name.clone(), p.clone(), log.clone()));
                        }
                    }
                    Arc::new(d)
                }
            };
            next.insert(name, d);
        }
        self.by_name = next;
        for (name, problem, _) in &problems {
            Spi::run_with_args("SELECT cde._destination_problem($1, $2)", &[name.as_str().into(), problem.as_str().into()])
                .unwrap_or_else(|e| error!("cde: {e}"));
        }
        let problems = problems.into_iter().map(|(name, _, log)| (name, log)).collect();
        Refreshed { problems, set_again }
    }
}

pub struct Refreshed {
    pub problems: Vec<(String, String)>,
    pub set_again: Vec<String>,
}

/// One destination from its row and the server's settings (which give `default` its endpoint
/// and key, and every destination the values its options leave out).
fn build(settings: &Settings, name: &str, endpoint: Option<String>, opts: &str, disabled: bool, version: String) -> Destination {
    let parsed: Result<Options, String> =
        serde_json::from_str(opts).map_err(|e| e.to_string()).and_then(|v| options::parse(&v));
    let mut problem = None;
    let o = parsed.unwrap_or_else(|e| {
        problem = Some(format!("options: {e}"));
        Options::default()
    });
    let (endpoint, mut api_key) = if name == DEFAULT {
        (settings.endpoint.clone(), settings.api_key.clone())
    } else {
        (endpoint.map(|e| e.trim_end_matches('/').to_string()), None)
    };
    // The problem as cde_destinations shows it (to monitors: no path); the log names the file.
    let mut problem_logged = None;
    if let Some(path) = &o.api_key_file {
        match read_key_file(path) {
            Ok(k) => api_key = Some(k),
            Err(e) => problem_logged = problem_logged.or(Some((e.replace(&format!(" {path}"), ""), e))),
        }
    }
    let mut secrets = Vec::new();
    if let Some(path) = &o.signing_secret_file {
        match read_secret_file(path) {
            Ok(s) => secrets = s,
            Err(e) => problem_logged = problem_logged.or(Some((e.replace(&format!(" {path}"), ""), e))),
        }
    }
    let problem_log = problem_logged.as_ref().map(|p| p.1.clone()).or(problem.clone());
    problem = problem.or(problem_logged.map(|p| p.0));
    Destination {
        name: name.to_string(),
        endpoint,
        api_key,
        secrets,
        spacing: options::request_spacing(o.max_requests_per_second),
        batch_size: o.batch_size.unwrap_or(settings.batch_size),
        max_batch_bytes: o.max_batch_bytes.unwrap_or(settings.max_batch_bytes),
        timeout: o.timeout.unwrap_or(settings.http_timeout),
        compression: o.compression.unwrap_or(settings.compression),
        headers: o.headers,
        response_id_header: o.response_id_header.unwrap_or_else(|| "x-request-id".into()),
        log_payloads: settings.log_payloads,
        problem,
        problem_log,
        disabled,
        version,
        read_at: Instant::now(),
    }
}

/// A bearer key file's first line. The error names the file, never what it holds.
pub fn read_key_file(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read api_key_file {path}: {e}"))?;
    text.lines().next().map(|l| l.trim().to_string()).filter(|k| !k.is_empty()).ok_or_else(|| format!("api_key_file {path} is empty"))
}

/// A signing secret file: one `whsec_...` per line.
pub fn read_secret_file(path: &str) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read signing_secret_file {path}: {e}"))?;
    cde_protocol::sign::parse_secret_file(&text).map_err(|e| format!("signing_secret_file {path}: {e}"))
}

#[pg_schema]
mod cde {
    use pgrx::prelude::*;

    /// Check a destination's options (cde_set_destination): every key known, every value of its
    /// type, every file readable by the server and of the right form. Raises an ERROR naming
    /// what is wrong; returns the options with the role names checked by the caller.
    #[pg_extern(stable, parallel_safe)]
    fn _check_destination_options(options: pgrx::JsonB) {
        let o = match cde_protocol::destination::parse(&options.0) {
            Ok(o) => o,
            Err(e) => {
                ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("cde: {e}"));
            }
        };
        if let Some(p) = &o.api_key_file {
            if let Err(e) = super::read_key_file(p) {
                ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("cde: {e}"),
                    "The file must be readable by the server's OS user, and hold the key on its first line.");
            }
        }
        if let Some(p) = &o.signing_secret_file {
            if let Err(e) = super::read_secret_file(p) {
                ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("cde: {e}"),
                    "The file must be readable by the server's OS user, and hold one whsec_... secret per line.");
            }
        }
    }

    /// A destination's endpoint: an absolute http(s) URL with no credentials (as cde.endpoint).
    /// The error never repeats the URL, which may hold a password.
    #[pg_extern(immutable, parallel_safe)]
    fn _check_endpoint(endpoint: Option<&str>) {
        match endpoint.map(crate::gucs::validate_endpoint) {
            None | Some(Ok(())) if endpoint.is_none_or(str::is_empty) => {
                ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "cde: a destination needs an endpoint (an http:// or https:// URL)");
            }
            Some(Err(why)) => {
                ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("cde: the endpoint {why}"));
            }
            _ => {}
        }
    }

    /// The role names of a destination's `roles` option (checked to exist by the caller).
    #[pg_extern(immutable, parallel_safe)]
    fn _destination_roles(options: pgrx::JsonB) -> Vec<String> {
        cde_protocol::destination::parse(&options.0).map(|o| o.roles).unwrap_or_default()
    }
}
