//! `[studies]`: human studies on finished jobs.

use serde::{Deserialize, Serialize};

/// `[studies]`: whether studies are on, and how long observer links live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudiesConfig {
    /// Human studies on finished jobs (`/studies`, observers' links); they need `jobs.enabled`.
    /// Off, their routes answer 503.
    pub enabled: bool,
    /// A new observer link works for this many hours (default 168, a week): a link is the
    /// observer's only credential and travels by mail and chat, so it must not work forever.
    pub observer_link_ttl_hours: u32,
    /// The most `expires_in_hours` one link may ask for (default 2160, 90 days).
    pub max_observer_link_ttl_hours: u32,
}

impl Default for StudiesConfig {
    fn default() -> Self {
        Self { enabled: true, observer_link_ttl_hours: 168, max_observer_link_ttl_hours: 2160 }
    }
}

impl StudiesConfig {
    pub fn validate(&self) -> Result<(), String> {
        let (ttl, max) = (self.observer_link_ttl_hours, self.max_observer_link_ttl_hours);
        if ttl == 0 || ttl > max {
            return Err(format!(
                "studies.observer_link_ttl_hours must be in 1..=studies.max_observer_link_ttl_hours ({max})"
            ));
        }
        Ok(())
    }
}
