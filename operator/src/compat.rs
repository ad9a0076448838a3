//! Before a migration freezes anything: can the target restore what CRIU dumps on the
//! source? The agents say what their nodes run (`NodeInfo`); the rule is the one the
//! target's agent applies again before it restores (`cryopod_agent_api::compat`).

use cryopod_agent_api::compat::{Facts, check};
use cryopod_agent_api::pb;

use crate::context::Context;
use crate::migration::machine::Choice;

/// The first of `candidates` (in order) that can restore what `source` dumps, else
/// the first whose agent could not be asked, marked unchecked (the migration decides
/// whether it may take it), else why none can: each candidate's reason. An agent that
/// is restarting (a rollout) does not fail a migration; only a node known to be unable
/// to restore does.
pub fn first_compatible(
    source: &pb::NodeFacts,
    candidates: &[(String, Result<pb::NodeFacts, String>)],
) -> Result<Choice, String> {
    let mut refused = Vec::new();
    let mut unknown = None;
    for (name, facts) in candidates {
        match facts {
            Ok(facts) => match check(&Facts::from(source), &Facts::from(facts)) {
                Ok(()) => return Ok(Choice::Checked(name.clone())),
                Err(why) => refused.push(why),
            },
            Err(why) => {
                unknown.get_or_insert_with(|| Choice::Unchecked {
                    node: name.clone(),
                    why: format!("the agent on {name} does not answer: {why}"),
                });
            }
        }
    }
    unknown.ok_or_else(|| {
        format!(
            "no target can restore what {} dumps, so nothing was frozen: {}",
            source.name,
            refused.join("; ")
        )
    })
}

async fn facts_of(ctx: &Context, node: &str) -> Result<pb::NodeFacts, String> {
    let mut client = ctx.agents.client(node).await.map_err(|e| e.to_string())?;
    client
        .node_info(pb::NodeInfoRequest::default())
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| status.message().to_owned())
}

/// [`first_compatible`] with the facts asked of the agents. When the source's agent
/// does not answer, nothing is compared: the first candidate is taken unchecked.
pub async fn choose_target(ctx: &Context, source: &str, candidates: &[String]) -> Result<Choice, String> {
    let source_facts = match facts_of(ctx, source).await {
        Ok(facts) => facts,
        Err(why) => {
            tracing::info!(source, %why, "cannot ask the source's agent what it runs");
            return candidates
                .first()
                .map(|node| Choice::Unchecked {
                    node: node.clone(),
                    why: format!("the agent on {source} does not answer: {why}"),
                })
                .ok_or_else(|| format!("no node other than {source} to move to"));
        }
    };
    let mut asked = Vec::with_capacity(candidates.len());
    for name in candidates {
        asked.push((name.clone(), facts_of(ctx, name).await));
    }
    first_compatible(&source_facts, &asked)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn node(name: &str, cgroup: &str) -> pb::NodeFacts {
        pb::NodeFacts {
            name: name.into(),
            kernel: "6.18.0".into(),
            criu_version: "4.2.1".into(),
            cgroup_version: cgroup.into(),
            cpu_flags: vec!["avx2".into()],
        }
    }

    #[test]
    fn the_first_target_that_can_restore_is_chosen_else_every_reason_is_named() {
        let source = node("node-1", "V1");
        let candidates = vec![
            ("node-2".to_owned(), Err("connection refused".to_owned())),
            ("node-3".to_owned(), Ok(node("node-3", "V2"))),
            ("node-4".to_owned(), Ok(node("node-4", "V1"))),
        ];
        assert_eq!(
            first_compatible(&source, &candidates).unwrap(),
            Choice::Checked("node-4".into())
        );
        // None known to fit: the one whose agent did not answer, marked unchecked.
        assert_eq!(
            first_compatible(&source, &candidates[..2]).unwrap(),
            Choice::Unchecked {
                node: "node-2".into(),
                why: "the agent on node-2 does not answer: connection refused".into()
            }
        );
        let err = first_compatible(&source, &candidates[1..2]).unwrap_err();
        assert_eq!(
            err,
            "no target can restore what node-1 dumps, so nothing was frozen: node-1 runs cgroup V1 and node-3 runs \
             cgroup V2: CRIU restores a process only under the cgroup version it was dumped on"
        );
    }
}
