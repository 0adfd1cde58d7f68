//! Admission control: how many sessions everyone, one source address, and one credential may
//! hold at once.
//!
//! A [`Permit`] is taken before the HTTP upgrade is answered and lives as long as the session
//! task; dropping it gives the seats back. All counts sit behind one mutex, held only for a
//! few map operations per session start and end, never per frame.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::config::Limits;

/// Why a session was not admitted: the `reason` label of `voxflow_sessions_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds `limits.max_sessions`.
    Capacity,
    /// The source address holds `limits.max_sessions_per_ip`.
    PerIp,
    /// The API key or JWT subject holds its own limit.
    PerKey,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Capacity => "capacity",
            Refusal::PerIp => "per_ip",
            Refusal::PerKey => "per_key",
        }
    }
}

/// A credential's own limit: who, and how many sessions it may hold (0 = none of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub principal: String,
    pub max_sessions: usize,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_principal: HashMap<String, usize>,
}

pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Take a seat for a session from `ip` holding `quota`, or say which limit is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, quota: Option<Quota>) -> Result<Permit, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.limits.max_sessions {
            return Err(Refusal::Capacity);
        }
        if counts.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_sessions_per_ip {
            return Err(Refusal::PerIp);
        }
        let quota = quota.filter(|q| q.max_sessions > 0);
        if let Some(quota) = &quota
            && counts
                .per_principal
                .get(&quota.principal)
                .copied()
                .unwrap_or(0)
                >= quota.max_sessions
        {
            return Err(Refusal::PerKey);
        }
        counts.total += 1;
        *counts.per_ip.entry(ip).or_default() += 1;
        let principal = quota.map(|q| q.principal);
        if let Some(principal) = &principal {
            *counts.per_principal.entry(principal.clone()).or_default() += 1;
        }
        Ok(Permit {
            admission: Arc::clone(self),
            ip,
            principal,
        })
    }

    /// Sessions admitted now.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// One admitted session's seats; given back on drop.
pub struct Permit {
    admission: Arc<Admission>,
    ip: IpAddr,
    principal: Option<String>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        release(&mut counts.per_ip, &self.ip);
        if let Some(principal) = &self.principal {
            release(&mut counts.per_principal, principal);
        }
    }
}

/// Decrement, removing the entry at zero so the maps hold only live holders.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admission(max: usize, per_ip: usize) -> Arc<Admission> {
        Admission::new(Limits {
            max_sessions: max,
            max_sessions_per_ip: per_ip,
            max_session_duration: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(1),
            retry_after: Duration::from_secs(1),
        })
    }

    #[test]
    fn each_limit_refuses_and_seats_come_back() {
        let a = admission(3, 2);
        let ip1: IpAddr = "127.0.0.1".parse().unwrap();
        let ip2: IpAddr = "127.0.0.2".parse().unwrap();
        let key = |n| {
            Some(Quota {
                principal: "k".into(),
                max_sessions: n,
            })
        };
        let p1 = a.admit(ip1, key(1)).unwrap();
        assert_eq!(a.admit(ip2, key(1)).err(), Some(Refusal::PerKey));
        let _p2 = a.admit(ip1, None).unwrap();
        assert_eq!(a.admit(ip1, None).err(), Some(Refusal::PerIp));
        let _p3 = a.admit(ip2, None).unwrap();
        assert_eq!(a.admit(ip2, None).err(), Some(Refusal::Capacity));
        drop(p1);
        assert_eq!(a.active(), 2);
        let _p4 = a.admit(ip2, key(1)).unwrap();
        let counts = a.counts.lock().unwrap();
        assert_eq!(counts.per_ip.len(), 2);
        assert_eq!(counts.per_principal.len(), 1);
    }

    #[test]
    fn maps_empty_when_everyone_leaves() {
        let a = admission(10, 10);
        let permits: Vec<_> = (0..5)
            .map(|i| {
                a.admit(IpAddr::from([127, 0, 0, i]), None::<Quota>)
                    .unwrap()
            })
            .collect();
        drop(permits);
        let counts = a.counts.lock().unwrap();
        assert_eq!(
            (
                counts.total,
                counts.per_ip.len(),
                counts.per_principal.len()
            ),
            (0, 0, 0)
        );
    }
}
