//! Kubernetes objects into the policy model.
