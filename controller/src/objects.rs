//! What sources hand the controller: Kubernetes objects already converted (by
//! `palisade-resources`, the one conversion path for files and API objects) into only the
//! fields that matter, so churn in status, annotations or resourceVersion compares equal.

use std::collections::BTreeSet;
use std::fmt;

use palisade_policy::{Namespace, Node, PodKey, PolicyId, PolicyKind};
use palisade_resources::core::{PodObject, Service};
use palisade_resources::Converted;

/// The kinds the controller watches; a relist covers one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    Policy(PolicyKind),
}

impl Kind {
    pub const CORE: [Kind; 5] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::Policy(PolicyKind::NetworkPolicy),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::Policy(k) => k.as_str(),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKey {
    Namespace(String),
    Node(String),
    Pod(PodKey),
    Service { namespace: String, name: String },
    Policy(PolicyId),
}

impl ObjectKey {
    pub fn kind(&self) -> Kind {
        match self {
            ObjectKey::Namespace(_) => Kind::Namespace,
            ObjectKey::Node(_) => Kind::Node,
            ObjectKey::Pod(_) => Kind::Pod,
            ObjectKey::Service { .. } => Kind::Service,
            ObjectKey::Policy(id) => Kind::Policy(id.kind),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::Namespace(n) => write!(f, "Namespace {n}"),
            ObjectKey::Node(n) => write!(f, "Node {n}"),
            ObjectKey::Pod(k) => write!(f, "Pod {k}"),
            ObjectKey::Service { namespace, name } => write!(f, "Service {namespace}/{name}"),
            ObjectKey::Policy(id) => write!(f, "{id}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Node(Node),
    Pod(PodObject),
    Service(Service),
    Policy(Converted),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(n) => ObjectKey::Namespace(n.name.clone()),
            Object::Node(n) => ObjectKey::Node(n.name.clone()),
            Object::Pod(p) => ObjectKey::Pod(PodKey::new(&p.namespace, &p.name)),
            Object::Service(s) => ObjectKey::Service {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            },
            Object::Policy(c) => ObjectKey::Policy(c.policy.id.clone()),
        }
    }
}

/// One thing a source saw.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    Upsert(Object),
    Delete(ObjectKey),
    /// The object exists but Palisade cannot use it: its last good version (if any) stays
    /// in force, and the error is reported on it.
    Invalid {
        key: ObjectKey,
        error: String,
    },
    /// A full list of one kind: objects of that kind not in `keys` are gone.
    Relisted {
        kind: Kind,
        keys: BTreeSet<ObjectKey>,
    },
    /// Every kind the source serves has been listed once: the state is complete.
    Synced,
    /// `event` is about the object's `metadata.generation` (API sources), which status
    /// reports name as the version they observed.
    AtGeneration(Box<SourceEvent>, i64),
}

impl SourceEvent {
    /// The one object the event is about.
    pub fn key(&self) -> Option<ObjectKey> {
        match self {
            SourceEvent::Upsert(o) => Some(o.key()),
            SourceEvent::Delete(k) | SourceEvent::Invalid { key: k, .. } => Some(k.clone()),
            SourceEvent::AtGeneration(e, _) => e.key(),
            SourceEvent::Relisted { .. } | SourceEvent::Synced => None,
        }
    }

    pub fn at_generation(self, generation: Option<i64>) -> SourceEvent {
        match generation {
            Some(g) => SourceEvent::AtGeneration(Box::new(self), g),
            None => self,
        }
    }
}
