//! The kubelet's PodResources v1 service (`v1.PodResourcesLister`), generated
//! at build time from the upstream proto committed under `proto/` (see
//! build.rs). The observer uses the client; the tests' fake kubelet enables
//! the `server` feature.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("v1");
}
