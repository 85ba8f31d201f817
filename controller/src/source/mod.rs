//! Where objects come from: the Kubernetes API ([`kube`]) or files ([`files`]). Both hand
//! the compile loop the same [`SourceEvent`](crate::objects::SourceEvent)s.

pub mod files;
pub mod kube;
