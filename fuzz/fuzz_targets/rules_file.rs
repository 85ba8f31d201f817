//! The agent's rules file (`--rules`: a NodeRuleSet as JSON or YAML): no panic, and what
//! decodes survives the agent's own round trip (serialized and parsed again, it is equal).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: palisade_fuzz::seeds::from_env(palisade_fuzz::seeds::rules), |data: &[u8]| {
    let Some(text) = palisade_fuzz::text(data) else {
        return;
    };
    if let Ok(rules) = palisade_resources::rules_file::parse(&text) {
        let json = serde_json::to_string(&rules).expect("a rule set serializes");
        let again = palisade_resources::rules_file::parse(&json)
            .unwrap_or_else(|e| panic!("a decoded rule set must decode again: {e}\n{json}"));
        assert_eq!(again, rules);
    }
});
