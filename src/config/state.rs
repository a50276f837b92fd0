//! The `[state]` table: what every listener's shared state does beyond the
//! process (its `limit` buckets shared through Redis), and the same checks for
//! the `--state-redis` flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use schemars::JsonSchema;
use serde::Deserialize;

use super::bounds::parse_duration;
use crate::state::ClusterSpec;
use crate::text::{quote, redacted};

/// `[state]`: what every listener's shared state does beyond the process.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct StateSection {
    /// Shares the handlers' `limit` buckets, `state_incr` counters and
    /// penalties with every gateway using this Redis: `redis://HOST:PORT`,
    /// `rediss://` for TLS, or `redis+unix://PATH`.
    redis: Option<String>,
    /// While Redis cannot be reached: `open` (each gateway limits on its own,
    /// the default) or `closed` (limited calls are refused).
    redis_failure: Option<String>,
    /// How often what the limits spent is sent to Redis, e.g. `5ms` (the default).
    redis_flush: Option<String>,
    /// The name this service's keys are kept under in Redis (default: the
    /// listener's name); gateways that share limits must give the same one.
    namespace: Option<String>,
    /// The CA certificates (PEM) a `rediss://` server is checked against,
    /// instead of the system's.
    redis_ca: Option<PathBuf>,
}

/// How often gateways tell each other what their limits spent, unless told.
pub const DEFAULT_REDIS_FLUSH: Duration = Duration::from_millis(5);

/// Checks a Redis namespace: 1 to 64 letters, digits, `.`, `_` or `-` (no
/// `:`, which would reach into another namespace's keys).
pub fn check_namespace(name: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "`{}` is not a namespace: give 1 to 64 letters, digits, `.`, `_` or `-`",
            quote(name)
        ))
    }
}

/// Checks a `[state]` Redis URL and its options into a [`ClusterSpec`].
pub fn cluster_spec(
    url: &str,
    failure: Option<&str>,
    flush: Duration,
    namespace: Option<&str>,
    ca: Option<&Path>,
) -> anyhow::Result<ClusterSpec> {
    if !["redis://", "rediss://", "redis+unix://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
    {
        bail!(
            "`{}` is not a Redis URL: write redis://HOST:PORT (rediss:// for TLS)",
            quote(&redacted(url))
        );
    }
    if ca.is_some() && !url.starts_with("rediss://") {
        bail!("a Redis CA file is for TLS: write rediss://HOST:PORT");
    }
    if flush.is_zero() || flush > Duration::from_secs(1) {
        bail!("the flush interval must be from 1ms to 1s");
    }
    let fail_closed = match failure {
        None | Some("open") => false,
        Some("closed") => true,
        Some(other) => bail!("`{}` is not `open` or `closed`", quote(other)),
    };
    let namespace = namespace.map(check_namespace).transpose().map_err(anyhow::Error::msg)?;
    Ok(ClusterSpec {
        url: url.to_string(),
        fail_closed,
        flush,
        namespace,
        ca: ca.map(Path::to_path_buf),
    })
}

impl StateSection {
    /// The cluster scope the table asks for, if any.
    /// `base`: the directory a relative CA path is read from.
    pub(super) fn cluster(&self, base: &Path) -> anyhow::Result<Option<ClusterSpec>> {
        let Some(url) = &self.redis else {
            if self.redis_failure.is_some()
                || self.redis_flush.is_some()
                || self.namespace.is_some()
                || self.redis_ca.is_some()
            {
                bail!("state: redis_failure, redis_flush, redis_ca and namespace need redis = \"redis://HOST:PORT\"");
            }
            return Ok(None);
        };
        let flush = match &self.redis_flush {
            Some(d) => parse_duration(d)
                .map_err(anyhow::Error::msg)
                .context("state.redis_flush")?,
            None => DEFAULT_REDIS_FLUSH,
        };
        Ok(Some(
            cluster_spec(
                url,
                self.redis_failure.as_deref(),
                flush,
                self.namespace.as_deref(),
                self.redis_ca.as_ref().map(|ca| base.join(ca)).as_deref(),
            )
            .context("state.redis")?,
        ))
    }
}
