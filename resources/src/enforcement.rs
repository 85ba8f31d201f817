//! The `palisade.dev/enforcement` annotation of a policy object (audit or enforce).
//!
//! The apiserver accepts any annotation value, so a value that means nothing is not a
//! reason to reject the policy: it is warned about, naming the field, and the policy is
//! enforced (fails closed). No other annotation is read, so churn in them stays a no-op.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use palisade_policy::{Enforcement, ENFORCEMENT_KEY};

/// The mode the object's annotation asks for, and a warning (field path, message) for a
/// value that is neither `audit` nor `enforce`.
pub(crate) fn annotation(meta: &ObjectMeta) -> (Option<Enforcement>, Option<(String, String)>) {
    let Some(value) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ENFORCEMENT_KEY))
    else {
        return (None, None);
    };
    match Enforcement::parse(value) {
        Some(mode) => (Some(mode), None),
        None => (
            Some(Enforcement::Enforce),
            Some((
                format!("metadata.annotations[{ENFORCEMENT_KEY}]"),
                format!("unknown value {value:?} (audit or enforce); the policy is enforced"),
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(value: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            annotations: value.map(|v| {
                [
                    (ENFORCEMENT_KEY.to_string(), v.to_string()),
                    ("other".to_string(), "x".to_string()),
                ]
                .into()
            }),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn reads_audit_enforce_and_fails_closed_on_anything_else() {
        assert_eq!(annotation(&meta(None)), (None, None));
        assert_eq!(
            annotation(&meta(Some("audit"))),
            (Some(Enforcement::Audit), None)
        );
        assert_eq!(
            annotation(&meta(Some("enforce"))),
            (Some(Enforcement::Enforce), None)
        );
        let (mode, warning) = annotation(&meta(Some("Audit")));
        assert_eq!(mode, Some(Enforcement::Enforce));
        let (path, message) = warning.expect("a warning");
        assert_eq!(path, "metadata.annotations[palisade.dev/enforcement]");
        assert!(message.contains("\"Audit\""), "{message}");
    }
}
