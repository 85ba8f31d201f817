//! What the fuzz targets share: turning raw bytes into the text a loader would see, the
//! stream framing of the controller's updates, and the property tests' generators driven
//! by the fuzzer's bytes.

use palisade_wire::pb::NodeUpdate;
use prost::Message;

/// The property tests' generators (`policy/tests/support`), reused as they are: a proptest
/// runner whose "random" bytes are the fuzzer's input (`RngAlgorithm::PassThrough`) turns
/// each input into one scenario, so libFuzzer's mutations become changes to the cluster and
/// its policies, and both sides test the same distribution.
#[path = "../../policy/tests/support/mod.rs"]
pub mod support;

/// A file's bytes as the loaders read them (BOM dropped, UTF-8 checked), or `None` when the
/// loaders refuse them before parsing; the refusal must say where the bad byte is.
/// A 32-byte seed for the generators' RNG, from every byte of the input (its first 32
/// bytes, mixed with a hash of all of it). Not proptest's pass-through RNG: each of its
/// forks (every `prop_flat_map`) takes half of what is left, so a deep generator soon
/// draws zeros, and with zeros some of them never finish.
pub fn rng_seed(data: &[u8]) -> [u8; 32] {
    let mut x = data.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }) | 1;
    let mut seed = [0u8; 32];
    for (i, chunk) in seed.chunks_mut(8).enumerate() {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
        for (j, b) in chunk.iter_mut().enumerate() {
            *b ^= data.get(i * 8 + j).copied().unwrap_or(0);
        }
    }
    seed
}

pub fn text(data: &[u8]) -> Option<String> {
    match palisade_resources::strict::text_of(data.to_vec()) {
        Ok(text) => Some(text),
        Err(message) => {
            assert!(
                message.contains("byte offset") || message.contains("UTF-16"),
                "an encoding error must locate the problem: {message}"
            );
            None
        }
    }
}

/// A stream as the agent receives it: NodeUpdate messages, each length-delimited (the
/// gRPC frames carry one message each; the framing here only splits one input into several).
pub fn updates(mut data: &[u8]) -> Vec<NodeUpdate> {
    let mut out = Vec::new();
    while !data.is_empty() {
        match NodeUpdate::decode_length_delimited(&mut data) {
            Ok(u) => out.push(u),
            Err(_) => break,
        }
    }
    out
}

/// The inverse of [`updates`], for seeds.
pub fn frame(updates: &[NodeUpdate]) -> Vec<u8> {
    let mut out = Vec::new();
    for u in updates {
        u.encode_length_delimited(&mut out)
            .expect("a Vec grows as needed");
    }
    out
}

/// Seeds compiled from conformance scenarios, for the targets whose input no scenario file
/// is: written by the target itself at start-up (its `init`), before libFuzzer reads its
/// corpus, when `scripts/fuzz.sh` asks for them (`PALISADE_FUZZ_SEED_DIR`: the corpus;
/// `PALISADE_FUZZ_SCENARIOS`: scenario directories, one a line). So they follow the
/// scenarios as they change, and nothing binary is kept in the repository.
pub mod seeds {
    use std::path::Path;

    use palisade_policy::{Compiler, NodeRuleSet};
    use palisade_resources::Scenario;

    /// One rule set per scenario (its first node), as the agent's JSON rules file, and
    /// every eighth also as YAML.
    pub fn rules(scenarios: &[Scenario]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (i, s) in scenarios.iter().enumerate() {
            let sets = Compiler::new(s.cluster.clone(), s.policies.clone()).node_rule_sets();
            let Some(set) = sets.values().next() else {
                continue;
            };
            let json = serde_json::to_string_pretty(set).expect("a rule set serializes");
            if i % 8 == 0 {
                let value: serde_json::Value = serde_json::from_str(&json).expect("just written");
                let yaml = serde_yaml::to_string(&value).expect("a JSON value is YAML");
                out.push((format!("{}.yaml", s.name), yaml.into_bytes()));
            }
            out.push((format!("{}.json", s.name), json.into_bytes()));
        }
        out
    }

    /// Per scenario, a stream for its first node: the snapshot, the delta to the state with
    /// every other policy left out, and the delta back.
    pub fn stream(scenarios: &[Scenario]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for s in scenarios {
            let sets = Compiler::new(s.cluster.clone(), s.policies.clone()).node_rule_sets();
            let half: Vec<_> = s.policies.iter().step_by(2).cloned().collect();
            let halves = Compiler::new(s.cluster.clone(), half).node_rule_sets();
            let Some((node, full)) = sets.iter().next() else {
                continue;
            };
            let empty = NodeRuleSet {
                node: node.clone(),
                ..Default::default()
            };
            let other = halves.get(node).unwrap_or(&empty);
            let updates: Vec<_> = [
                palisade_wire::diff(None, full),
                palisade_wire::diff(Some(full), other),
                palisade_wire::diff(Some(other), full),
            ]
            .into_iter()
            .zip(1..)
            .map(|(u, generation)| palisade_wire::pb::NodeUpdate { generation, ..u })
            .collect();
            out.push((format!("{}.bin", s.name), super::frame(&updates)));
            // The same stream as an agent from before shared lists and patches gets it.
            let inline = palisade_wire::Form::INLINE;
            let updates: Vec<_> = [
                palisade_wire::diff_in(None, full, inline),
                palisade_wire::diff_in(Some(full), other, inline),
            ]
            .into_iter()
            .zip(1..)
            .map(|(u, generation)| palisade_wire::pb::NodeUpdate { generation, ..u })
            .collect();
            out.push((format!("{}-inline.bin", s.name), super::frame(&updates)));
        }
        out
    }

    /// Writes `make`'s seeds when the environment asks for them (see the module).
    pub fn from_env(make: fn(&[Scenario]) -> Vec<(String, Vec<u8>)>) {
        let (Ok(dir), Ok(list)) = (
            std::env::var("PALISADE_FUZZ_SEED_DIR"),
            std::env::var("PALISADE_FUZZ_SCENARIOS"),
        ) else {
            return;
        };
        let scenarios: Vec<Scenario> = list
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|d| palisade_resources::load_scenario(Path::new(d.trim())).ok())
            .collect();
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).expect("the corpus directory");
        for (name, bytes) in make(&scenarios) {
            std::fs::write(dir.join(format!("scenario-{name}")), bytes).expect("a seed");
        }
    }
}
