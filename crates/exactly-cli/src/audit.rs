//! `exactly audit`: the audit trail, operators' and administrators' writes with the token that
//! made each (needs an admin token on a cluster with tokens).

use clap::Args;
use exactly_client::{AuditRecord, Client};

use crate::output::{emit, emit_json, time_ms, Table};

#[derive(Args, Debug, PartialEq)]
pub struct AuditArgs {
    /// Show this many records: the newest, or the first after --after.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Only records after this log index (the INDEX column), oldest first.
    #[arg(long, value_name = "INDEX")]
    pub after: Option<u64>,
}

#[derive(serde::Serialize)]
struct RecordView<'a> {
    index: u64,
    at_ms: u64,
    by: &'a str,
    action: &'a str,
    outcome: &'a str,
}

pub fn render(records: &[AuditRecord]) -> String {
    if records.is_empty() {
        return "no audited writes\n".into();
    }
    let mut table = Table::new(&["INDEX", "AT", "BY", "ACTION", "OUTCOME"]);
    for r in records {
        table.row(vec![
            r.index.to_string(),
            time_ms(r.at_ms),
            r.by.clone(),
            r.action.clone(),
            r.outcome.clone(),
        ]);
    }
    table.render()
}

pub async fn run(client: &Client, args: &AuditArgs, json: bool) -> anyhow::Result<()> {
    let records = client.audit(args.after.unwrap_or(0), args.limit).await?;
    if json {
        let views: Vec<RecordView<'_>> = records
            .iter()
            .map(|r| RecordView {
                index: r.index,
                at_ms: r.at_ms,
                by: &r.by,
                action: &r.action,
                outcome: &r.outcome,
            })
            .collect();
        return emit_json(&views);
    }
    emit(&render(&records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_render_as_a_table() {
        assert_eq!(render(&[]), "no audited writes\n");
        let text = render(&[AuditRecord {
            index: 42,
            at_ms: 1_700_000_000_000,
            by: "ops".into(),
            action: "cancel jobs 7".into(),
            outcome: "1 of 1 cancelled".into(),
        }]);
        assert!(text.contains("INDEX") && text.contains("ops"), "{text}");
        assert!(
            text.contains("cancel jobs 7") && text.contains("2023-11-14T22:13:20"),
            "{text}"
        );
    }
}
