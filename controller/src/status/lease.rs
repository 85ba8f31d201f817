//! Which replica writes status: the holder of the election Lease.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use super::{now, StatusWriter, LEASE_SECONDS};

impl StatusWriter {
    /// Takes or renews the Lease; true while this replica holds it.
    pub(super) async fn hold_lease(&self) -> kube::Result<bool> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let mine = |lease: Option<Lease>| Lease {
            metadata: ObjectMeta {
                name: Some(self.lease.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: lease
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                acquire_time: lease
                    .as_ref()
                    .and_then(|l| l.spec.as_ref())
                    .filter(|s| s.holder_identity.as_deref() == Some(&self.identity))
                    .and_then(|s| s.acquire_time.clone())
                    .or_else(|| Some(now())),
                renew_time: Some(now()),
                ..Default::default()
            }),
        };
        let Some(current) = api.get_opt(&self.lease).await? else {
            return match api.create(&PostParams::default(), &mine(None)).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(&self.identity);
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
            age.as_secs_f64() > f64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS))
        });
        if !held_by_me && !expired {
            return Ok(false);
        }
        // The resourceVersion makes this a compare-and-swap: of two replicas taking an
        // expired Lease at once, one gets a conflict.
        match api
            .replace(&self.lease, &PostParams::default(), &mine(Some(current)))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
