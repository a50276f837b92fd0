//! The `[state]` table: what every listener's shared state does beyond the
//! process (its `limit` buckets shared through Redis), and the same checks for
//! the `--state-redis` flags.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;

use super::parse_duration;
use crate::state::ClusterSpec;
use crate::text::quote;

/// `[state]`: what every listener's shared state does beyond the process.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateSection {
    redis: Option<String>,
    redis_failure: Option<String>,
    redis_flush: Option<String>,
}

/// How often gateways tell each other what their limits spent, unless told.
pub const DEFAULT_REDIS_FLUSH: Duration = Duration::from_millis(5);

/// Checks a `[state]` Redis URL and its options into a [`ClusterSpec`].
pub fn cluster_spec(url: &str, failure: Option<&str>, flush: Duration) -> anyhow::Result<ClusterSpec> {
    if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
        bail!("`{}` is not a Redis URL: write redis://HOST:PORT", quote(url));
    }
    if flush.is_zero() || flush > Duration::from_secs(1) {
        bail!("the flush interval must be from 1ms to 1s");
    }
    let fail_closed = match failure {
        None | Some("open") => false,
        Some("closed") => true,
        Some(other) => bail!("`{}` is not `open` or `closed`", quote(other)),
    };
    Ok(ClusterSpec {
        url: url.to_string(),
        fail_closed,
        flush,
    })
}

impl StateSection {
    /// The cluster scope the table asks for, if any.
    pub(super) fn cluster(&self) -> anyhow::Result<Option<ClusterSpec>> {
        let Some(url) = &self.redis else {
            if self.redis_failure.is_some() || self.redis_flush.is_some() {
                bail!("state: redis_failure and redis_flush need redis = \"redis://HOST:PORT\"");
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
            cluster_spec(url, self.redis_failure.as_deref(), flush).context("state.redis")?,
        ))
    }
}
