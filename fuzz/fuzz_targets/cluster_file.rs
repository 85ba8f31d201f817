//! A cluster file (Namespaces, Pods, Nodes, Services; YAML, JSON being YAML too), as
//! palisadectl, the agent and the controller's file source load it: no panic, and a file
//! is taken whole or refused with errors that name the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(text) = palisade_fuzz::text(data) else {
        return;
    };
    match palisade_resources::parse_cluster_text("cluster.yaml", &text) {
        Ok((cluster, _services)) => {
            // Whatever loads must compile.
            let _ = palisade_policy::compile(&cluster, &[]);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
            assert!(
                message.lines().all(|l| l.starts_with("cluster.yaml: ")),
                "every error line names the file: {message}"
            );
        }
    }
});
