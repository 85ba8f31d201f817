//! `probes.yaml` of a conformance scenario (FORMAT.md): flows with the verdict they must get.

use palisade_policy::{Cluster, Family, Flow, Pod, PodKey, Verdict};
use serde::Deserialize;
use serde_json::Value;

use crate::documents::typed;
use crate::error::{Errors, LoadError, ObjectError, ObjectRef};
use crate::fields;

/// One probe, resolved against the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Its place in `probes:`, from 0.
    pub index: usize,
    /// The probe as written, for messages: `x/a -> y/b TCP/http`.
    pub text: String,
    pub flow: Flow,
    pub expect: Verdict,
}

impl Probe {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::Probe {
            index: self.index,
            text: self.text.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbesFile {
    probes: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeDoc {
    from: String,
    to: String,
    port: PortValue,
    protocol: Option<String>,
    expect: String,
    family: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortValue {
    Number(i64),
    Name(String),
}

/// What a probe looks like in messages, from whatever parts of it are readable.
fn text_of(v: &Value) -> String {
    let field = |k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "?".to_string(),
    };
    let protocol = match v.get("protocol") {
        Some(Value::String(s)) => s.clone(),
        _ => "TCP".to_string(),
    };
    format!(
        "{} -> {} {protocol}/{}",
        field("from"),
        field("to"),
        field("port")
    )
}

/// Reads the probes of `text` and resolves them against `cluster`: every probe, or every
/// error (a probe naming a missing pod, a port name the destination does not have, ...).
pub fn parse_probes(file: &str, text: &str, cluster: &Cluster) -> Result<Vec<Probe>, LoadError> {
    let invalid = |errors| LoadError::Invalid {
        file: file.to_string(),
        errors,
    };
    let whole = ObjectRef::Document {
        index: 1,
        item: None,
    };
    let (value, duplicates) = crate::strict::yaml_value(serde_yaml::Deserializer::from_str(text))
        .map_err(|e| {
        invalid(vec![ObjectError::new(
            whole.clone(),
            "",
            format!("unparsable YAML: {e}"),
        )])
    })?;
    if !duplicates.is_empty() {
        return Err(invalid(
            duplicates
                .into_iter()
                .map(|path| ObjectError::new(whole.clone(), path, "duplicate key"))
                .collect(),
        ));
    }
    if value.is_null() {
        return Ok(Vec::new());
    }
    let doc: ProbesFile = typed(&value, &whole).map_err(|e| invalid(vec![e]))?;
    let mut probes = Vec::new();
    let mut errors = Vec::new();
    for (index, v) in doc.probes.unwrap_or_default().iter().enumerate() {
        let object = ObjectRef::Probe {
            index,
            text: text_of(v),
        };
        match typed::<ProbeDoc>(v, &object).and_then(|p| probe(&p, index, &object, cluster)) {
            Ok(p) => probes.push(p),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(probes)
    } else {
        Err(invalid(errors))
    }
}

fn pod<'a>(cluster: &'a Cluster, value: &str, field: &str, errs: &mut Errors) -> Option<&'a Pod> {
    let Some((ns, name)) = value.split_once('/') else {
        errs.add(field, format!("{value:?} is not <namespace>/<pod>"));
        return None;
    };
    let found = cluster.pods.get(&PodKey::new(ns, name));
    if found.is_none() {
        errs.add(field, format!("no pod {value} in the cluster"));
    }
    found
}

fn probe(
    p: &ProbeDoc,
    index: usize,
    object: &ObjectRef,
    cluster: &Cluster,
) -> Result<Probe, ObjectError> {
    let mut errs = Errors::default();
    let src = pod(cluster, &p.from, "from", &mut errs);
    let dst = pod(cluster, &p.to, "to", &mut errs);
    let protocol = fields::protocol(p.protocol.as_deref(), "protocol", &mut errs);
    let port = match &p.port {
        PortValue::Number(n) => Some(fields::port_number(*n, "port", &mut errs)),
        PortValue::Name(name) => dst.and_then(|d| {
            let port = d.named_port(name, protocol);
            if port.is_none() {
                errs.add(
                    "port",
                    format!("{} has no {protocol} container port named {name:?}", p.to),
                );
            }
            port
        }),
    };
    let expect = match p.expect.as_str() {
        "allow" => Verdict::Allow,
        "deny" => Verdict::Deny,
        other => {
            errs.add("expect", format!("{other:?} is neither allow nor deny"));
            Verdict::Deny
        }
    };
    let family = match p.family.as_deref() {
        Some("IPv4") => Some(Family::IPv4),
        Some("IPv6") => Some(Family::IPv6),
        Some(other) => {
            errs.add("family", format!("{other:?} is neither IPv4 nor IPv6"));
            None
        }
        None => dst.and_then(|d| d.ips.first().map(Family::of)),
    };
    if let Some(family) = family {
        for (field, end) in [("from", src), ("to", dst)] {
            if let Some(end) = end.filter(|e| e.ip_of(family).is_none()) {
                errs.add(
                    field,
                    format!("{}/{} has no {family:?} address", end.namespace, end.name),
                );
            }
        }
    }
    let text = match object {
        ObjectRef::Probe { text, .. } => text.clone(),
        _ => String::new(),
    };
    match (src, dst, port, family) {
        (Some(src), Some(dst), Some(port), Some(family)) if errs.is_empty() => Ok(Probe {
            index,
            text,
            flow: Flow {
                src: src.key(),
                dst: dst.key(),
                protocol,
                port,
                family,
            },
            expect,
        }),
        _ => Err(errs.fail(object)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::{ContainerPort, Protocol};

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        for (ns, name, ips) in [
            ("x", "a", vec!["10.0.0.1"]),
            ("y", "b", vec!["10.0.0.2", "fd00::2"]),
        ] {
            c.pods.insert(
                PodKey::new(ns, name),
                Pod {
                    namespace: ns.into(),
                    name: name.into(),
                    labels: Default::default(),
                    node: "n".into(),
                    ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
                    host_network: false,
                    ports: vec![
                        ContainerPort {
                            name: Some("dns".into()),
                            port: 53,
                            protocol: Protocol::Udp,
                        },
                        ContainerPort {
                            name: Some("web".into()),
                            port: 8080,
                            protocol: Protocol::Tcp,
                        },
                    ],
                },
            );
        }
        c
    }

    #[test]
    fn probes_resolve_ports_protocols_and_families() {
        let probes = parse_probes(
            "probes.yaml",
            r#"
probes:
  - {from: x/a, to: y/b, port: web, expect: allow}
  - {from: x/a, to: y/b, port: dns, protocol: UDP, expect: deny}
  - {from: y/b, to: x/a, port: 443, protocol: SCTP, expect: deny, family: IPv4}
"#,
            &cluster(),
        )
        .unwrap();
        assert_eq!(probes.len(), 3);
        assert_eq!(probes[0].flow.port, 8080);
        assert_eq!(probes[0].flow.family, Family::IPv4);
        assert_eq!(probes[0].text, "x/a -> y/b TCP/web");
        assert_eq!(probes[1].flow.port, 53);
        assert_eq!(probes[1].flow.protocol, Protocol::Udp);
        assert_eq!(probes[1].expect, Verdict::Deny);
        assert_eq!(probes[2].flow.src, PodKey::new("y", "b"));
        assert_eq!(probes[2].flow.protocol, Protocol::Sctp);
    }

    #[test]
    fn bad_probes_are_all_reported() {
        let err = parse_probes(
            "probes.yaml",
            r#"
probes:
  - {from: x/missing, to: y/b, port: 80, expect: allow}
  - {from: x/a, to: y/b, port: dns, expect: allow}
  - {from: x/a, to: y/b, port: 0, expect: maybe}
  - {from: ab, to: y/b, port: 80, expect: allow, family: IPv6}
  - {from: y/b, to: x/a, port: 80, expect: allow, family: IPv6}
  - {from: y/b, to: x/a, port: 80, expect: allow, colour: red}
"#,
            &cluster(),
        )
        .unwrap_err();
        let lines: Vec<String> = err.to_string().lines().map(String::from).collect();
        assert_eq!(
            lines,
            vec![
                "probes.yaml: probes[0] (x/missing -> y/b TCP/80): from: no pod x/missing in the cluster",
                "probes.yaml: probes[1] (x/a -> y/b TCP/dns): port: y/b has no TCP container port named \"dns\"",
                "probes.yaml: probes[2] (x/a -> y/b TCP/0): port: port 0 is out of range 1..=65535",
                "probes.yaml: probes[2] (x/a -> y/b TCP/0): expect: \"maybe\" is neither allow nor deny",
                "probes.yaml: probes[3] (ab -> y/b TCP/80): from: \"ab\" is not <namespace>/<pod>",
                "probes.yaml: probes[4] (y/b -> x/a TCP/80): to: x/a has no IPv6 address",
                "probes.yaml: probes[5] (y/b -> x/a TCP/80): colour: unknown field `colour`, expected one of `from`, `to`, `port`, `protocol`, `expect`, `family`",
            ]
        );
    }

    #[test]
    fn an_empty_file_has_no_probes() {
        assert!(parse_probes("p", "", &cluster()).unwrap().is_empty());
        assert!(parse_probes("p", "probes: []", &cluster())
            .unwrap()
            .is_empty());
    }
}
