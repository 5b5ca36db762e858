//! Sessions per tenant on this node, capped, so that one tenant's burst (or runaway
//! client) cannot take every connection the node has. A [`Slot`] is held for the
//! life of a session's connection and given back when it drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct TenantQuota {
    limit: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open session of a tenant; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    quota: Arc<TenantQuota>,
    tenant: String,
}

impl TenantQuota {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place for one more session of `tenant`, unless it has `limit` already.
    pub fn try_take(self: &Arc<Self>, tenant: &str) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(tenant.to_string()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            quota: self.clone(),
            tenant: tenant.to_string(),
        })
    }

    /// Sessions `tenant` has open here.
    #[cfg(test)]
    fn open(&self, tenant: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(tenant).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.quota.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tenant_gets_its_limit_and_dropped_slots_come_back() {
        let quota = TenantQuota::new(2);
        let a1 = quota.try_take("a").unwrap();
        let _a2 = quota.try_take("a").unwrap();
        assert!(quota.try_take("a").is_none(), "a is at its limit");
        let _b1 = quota.try_take("b").expect("b is not held back by a");
        assert_eq!((quota.open("a"), quota.open("b")), (2, 1));
        drop(a1);
        assert_eq!(quota.open("a"), 1);
        assert!(quota.try_take("a").is_some());
    }
}
