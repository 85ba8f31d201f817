//! Issue 12.12: input encodings. A UTF-8 byte-order mark is dropped (YAML allows it), and
//! text that is not UTF-8 is an error that says where: byte offset and line.

use std::path::PathBuf;

use palisade_agent::source::load_rules;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const RULES: &[u8] = b"node: n1\nnode_addresses: []\npods: []\ngroups: {}\nrules: {}\n";
const POLICY: &[u8] = b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: a, name: p}\nspec: {podSelector: {}}\n";

#[test]
fn a_byte_order_mark_is_dropped_and_bad_bytes_are_located() {
    let d = Dir(std::env::temp_dir().join(format!("palisade-enc-{}", std::process::id())));
    std::fs::create_dir_all(&d.0).unwrap();
    let (rules, policies) = (d.0.join("rules.yaml"), d.0.join("policies.yaml"));
    let with_bom = |text: &[u8]| [&[0xef, 0xbb, 0xbf][..], text].concat();

    std::fs::write(&rules, with_bom(RULES)).unwrap();
    assert_eq!(load_rules(&rules).expect("BOM dropped").node, "n1");
    std::fs::write(&policies, with_bom(POLICY)).unwrap();
    let loaded = palisade_resources::load_policies(&policies).expect("BOM dropped");
    assert_eq!(loaded.policies.len(), 1);

    let mut bad = RULES.to_vec();
    bad[12] = 0xff; // line 2
    std::fs::write(&rules, &bad).unwrap();
    let err = load_rules(&rules).unwrap_err().to_string();
    assert!(
        err.contains("not UTF-8: byte 0xff at byte offset 12 (line 2)"),
        "{err}"
    );
    let mut bad = POLICY.to_vec();
    bad[40] = 0xc3; // a lone lead byte, line 2
    std::fs::write(&policies, &bad).unwrap();
    let err = palisade_resources::load_policies(&policies)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at byte offset 40 (line 2)"), "{err}");
}
