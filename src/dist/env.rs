//! A rank's place in a data-parallel job, read from the environment the way torch jobs are launched:
//! `torchrun` (and `safedpo launch`) set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR` and `MASTER_PORT`; under Slurm (`srun`) the rank and sizes come from `SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID` and `SLURM_NTASKS_PER_NODE`, the address from `MASTER_ADDR` or the
//! first host of `SLURM_JOB_NODELIST`, and the port from `MASTER_PORT`.
//!
//! Parsing reads a map of variables ([`RankEnv::from_vars`]), so the tests never touch the process
//! environment; every error names the variable.

use std::collections::HashMap;
use std::fmt;

use anyhow::{bail, ensure, Context, Result};

/// Where this process sits in a group of ranks, and where rank 0 waits for the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    /// This rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// This rank on its node, `0..local_world_size`: the GPU it takes.
    pub local_rank: usize,
    /// The ranks on this node.
    pub local_world_size: usize,
    /// Rank 0's host (a name or an address).
    pub master_addr: String,
    pub master_port: u16,
    /// The job's identity, checked at the rendezvous so that two jobs that share a port never mix
    /// ranks: `SAFEDPO_RUN_ID`, `TORCHELASTIC_RUN_ID`, or Slurm's job and step ids; empty when none.
    pub run_id: String,
    /// Which launcher's variables were read: `torchrun` or `slurm`.
    pub source: &'static str,
}

impl fmt::Display for RankEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} of {} (local {} of {}), rendezvous {}:{}",
            self.rank, self.world_size, self.local_rank, self.local_world_size, self.master_addr, self.master_port
        )
    }
}

impl RankEnv {
    /// From the process environment; `None` when it describes no group (neither `WORLD_SIZE` nor
    /// `SLURM_NTASKS` is set).
    pub fn from_env() -> Result<Option<Self>> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_vars(&vars)
    }

    /// From `vars` as from the environment. torchrun's variables win when `WORLD_SIZE` is set;
    /// Slurm's are read otherwise, when `SLURM_NTASKS` is set (a Slurm allocation that runs torchrun
    /// inside it has both).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Option<Self>> {
        let get = Vars(vars);
        let get = &get;
        let env = if get.get("WORLD_SIZE").is_some() {
            let world_size = positive(get, "WORLD_SIZE")?;
            let rank = required(get, "RANK", world_size)?;
            let local_world_size = match get.get("LOCAL_WORLD_SIZE") {
                Some(_) => positive(get, "LOCAL_WORLD_SIZE")?,
                None => world_size,
            };
            let local_rank = match get.get("LOCAL_RANK") {
                Some(_) => index(get, "LOCAL_RANK", local_world_size, "LOCAL_WORLD_SIZE")?,
                None if local_world_size == world_size => rank,
                None => bail!("LOCAL_RANK is not set (LOCAL_WORLD_SIZE={local_world_size} < WORLD_SIZE={world_size})"),
            };
            let (master_addr, master_port) = master(get, world_size, None)?;
            let run_id = get.get("SAFEDPO_RUN_ID").or(get.get("TORCHELASTIC_RUN_ID")).unwrap_or("").to_string();
            RankEnv {
                rank,
                world_size,
                local_rank,
                local_world_size,
                master_addr,
                master_port,
                run_id,
                source: "torchrun",
            }
        } else if get.get("SLURM_NTASKS").is_some() {
            let world_size = positive(get, "SLURM_NTASKS")?;
            let rank = required(get, "SLURM_PROCID", world_size)?;
            let local_world_size = match get.get("SLURM_NTASKS_PER_NODE") {
                // "4" or "4(x2)"; uneven forms ("4(x2),3") give the largest count, a bound for LOCALID.
                Some(text) => slurm_tasks_per_node(text).context("SLURM_NTASKS_PER_NODE")?,
                None => world_size,
            };
            let local_rank = index(get, "SLURM_LOCALID", local_world_size, "SLURM_NTASKS_PER_NODE")?;
            let nodelist = get.get("SLURM_JOB_NODELIST").or(get.get("SLURM_NODELIST"));
            let (master_addr, master_port) = master(get, world_size, nodelist)?;
            let run_id = match (get.get("SAFEDPO_RUN_ID"), get.get("SLURM_JOB_ID")) {
                (Some(id), _) => id.to_string(),
                (None, Some(job)) => format!("slurm-{job}.{}", get.get("SLURM_STEP_ID").unwrap_or("0")),
                (None, None) => String::new(),
            };
            RankEnv {
                rank,
                world_size,
                local_rank,
                local_world_size,
                master_addr,
                master_port,
                run_id,
                source: "slurm",
            }
        } else {
            for name in ["RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
                ensure!(get.get(name).is_none(), "{name} is set but WORLD_SIZE is not (set both, or neither)");
            }
            return Ok(None);
        };
        Ok(Some(env))
    }
}

/// The variables, an empty value read as unset.
struct Vars<'a>(&'a HashMap<String, String>);

impl<'a> Vars<'a> {
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }
}

type Get<'a, 'b> = &'b Vars<'a>;

fn number(get: Get, name: &str) -> Result<Option<usize>> {
    get.get(name)
        .map(|text| text.parse::<usize>().map_err(|_| anyhow::anyhow!("{name}={text:?} is not a whole number")))
        .transpose()
}

fn positive(get: Get, name: &str) -> Result<usize> {
    let n = number(get, name)?.with_context(|| format!("{name} is not set"))?;
    ensure!(n > 0, "{name}=0: a group needs at least one rank");
    Ok(n)
}

/// `name`, which must be set and below `world_size`.
fn required(get: Get, name: &str, world_size: usize) -> Result<usize> {
    let size_name = if name == "RANK" { "WORLD_SIZE" } else { "SLURM_NTASKS" };
    index(get, name, world_size, size_name)
}

fn index(get: Get, name: &str, bound: usize, bound_name: &str) -> Result<usize> {
    let i = number(get, name)?.with_context(|| format!("{name} is not set ({bound_name}={bound})"))?;
    ensure!(i < bound, "{name}={i} must be below {bound_name}={bound}");
    Ok(i)
}

/// `MASTER_ADDR` (else the first host of `nodelist`, else `127.0.0.1` for a group of one) and
/// `MASTER_PORT` (required for a group of more than one rank).
fn master(get: Get, world_size: usize, nodelist: Option<&str>) -> Result<(String, u16)> {
    let addr = match (get.get("MASTER_ADDR"), nodelist) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(list)) => first_host(list).with_context(|| format!("SLURM_JOB_NODELIST={list:?}"))?,
        (None, None) if world_size == 1 => "127.0.0.1".to_string(),
        (None, None) => bail!("MASTER_ADDR is not set (rank 0's host, where the ranks meet)"),
    };
    let port = match get.get("MASTER_PORT") {
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => bail!("MASTER_PORT={text:?} is not a port number (1 to 65535)"),
        },
        None if world_size == 1 => 0,
        None => bail!("MASTER_PORT is not set (the port rank 0 listens on, e.g. 29500)"),
    };
    Ok((addr, port))
}

/// The first host of a Slurm node list: `node7`, `node[01-04,07]` → `node01`, `a,b` → `a`,
/// `gpu[3,5]-ib` → `gpu3-ib`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    // The first entry: up to the first comma outside brackets.
    let mut depth = 0i32;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    ensure!(!entry.is_empty(), "an empty node list");
    let Some(open) = entry.find('[') else {
        return Ok(entry.to_string());
    };
    let close = entry[open..].find(']').map(|i| open + i).context("an unclosed `[` in the node list")?;
    let ranges = &entry[open + 1..close];
    let first = ranges.split(',').next().unwrap_or("");
    let start = first.split('-').next().unwrap_or("").trim();
    ensure!(
        !start.is_empty() && start.chars().all(|c| c.is_ascii_digit()),
        "cannot read the range `[{ranges}]` (set MASTER_ADDR)"
    );
    ensure!(!entry[close + 1..].contains('['), "more than one bracketed range in `{entry}` (set MASTER_ADDR)");
    Ok(format!("{}{start}{}", &entry[..open], &entry[close + 1..]))
}

/// The largest count in `SLURM_NTASKS_PER_NODE` (`4`, `4(x2)`, `4(x2),3`).
fn slurm_tasks_per_node(text: &str) -> Result<usize> {
    let mut largest = 0;
    for part in text.split(',') {
        let count = part.split('(').next().unwrap_or("").trim();
        let n: usize = count.parse().map_err(|_| anyhow::anyhow!("{text:?} is not a task count such as 4 or 4(x2)"))?;
        largest = largest.max(n);
    }
    ensure!(largest > 0, "{text:?}: no tasks on a node");
    Ok(largest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<Option<RankEnv>> {
        RankEnv::from_vars(&vars(pairs))
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        format!("{:#}", parse(pairs).expect_err("an error"))
    }

    const TORCHRUN: [(&str, &str); 6] = [
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "10.0.0.5"),
        ("MASTER_PORT", "29500"),
    ];

    #[test]
    fn torchrun_variables() {
        let mut pairs = TORCHRUN.to_vec();
        pairs.push(("TORCHELASTIC_RUN_ID", "job7"));
        let env = parse(&pairs).unwrap().unwrap();
        assert_eq!(
            env,
            RankEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: 2,
                master_addr: "10.0.0.5".into(),
                master_port: 29500,
                run_id: "job7".into(),
                source: "torchrun",
            }
        );
        // One node without the LOCAL_ variables: the local rank is the rank.
        let env = parse(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap();
        assert_eq!(env.map(|e| (e.local_rank, e.local_world_size)), Some((1, 2)));
    }

    #[test]
    fn no_group_without_world_size_and_a_group_of_one_needs_no_address() {
        assert_eq!(parse(&[]).unwrap(), None);
        let one = parse(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap().unwrap();
        assert_eq!((one.world_size, one.master_addr.as_str(), one.master_port), (1, "127.0.0.1", 0));
    }

    #[test]
    fn bad_torchrun_values_name_the_variable() {
        let with = |name: &str, value: &str| {
            let mut pairs: Vec<_> = TORCHRUN.iter().copied().filter(|(k, _)| *k != name).collect();
            if !value.is_empty() {
                pairs.push((name, value));
            }
            error(&pairs)
        };
        assert!(with("RANK", "8").contains("RANK=8 must be below WORLD_SIZE=8"), "{}", with("RANK", "8"));
        assert!(with("RANK", "").contains("RANK is not set"));
        assert!(with("RANK", "-1").contains("RANK=\"-1\" is not a whole number"));
        assert!(with("WORLD_SIZE", "0").contains("WORLD_SIZE=0"));
        assert!(with("LOCAL_RANK", "2").contains("LOCAL_RANK=2 must be below LOCAL_WORLD_SIZE=2"));
        assert!(with("LOCAL_RANK", "").contains("LOCAL_RANK is not set"));
        assert!(with("MASTER_PORT", "").contains("MASTER_PORT is not set"));
        assert!(with("MASTER_PORT", "70000").contains("MASTER_PORT=\"70000\""));
        assert!(with("MASTER_ADDR", "").contains("MASTER_ADDR is not set"));
        let err = error(&[("RANK", "0")]);
        assert!(err.contains("RANK is set but WORLD_SIZE is not"), "{err}");
    }

    #[test]
    fn slurm_variables() {
        let pairs = [
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "1234"),
            ("MASTER_PORT", "29400"),
        ];
        let env = parse(&pairs).unwrap().unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank, env.local_world_size), (5, 8, 1, 4));
        assert_eq!((env.master_addr.as_str(), env.master_port), ("gpu07", 29400));
        assert_eq!((env.run_id.as_str(), env.source), ("slurm-1234.0", "slurm"));

        // MASTER_ADDR wins over the node list; torchrun's variables over Slurm's.
        let mut with_addr = pairs.to_vec();
        with_addr.push(("MASTER_ADDR", "head"));
        assert_eq!(parse(&with_addr).unwrap().unwrap().master_addr, "head");
        let mut both = with_addr.clone();
        both.extend([("WORLD_SIZE", "2"), ("RANK", "1")]);
        assert_eq!(parse(&both).unwrap().unwrap().source, "torchrun");

        let bad: Vec<_> = pairs.iter().copied().filter(|(k, _)| *k != "SLURM_PROCID").collect();
        assert!(error(&bad).contains("SLURM_PROCID is not set"));
        let mut bad = pairs.to_vec();
        bad[1] = ("SLURM_PROCID", "8");
        assert!(error(&bad).contains("SLURM_PROCID=8 must be below SLURM_NTASKS=8"));
        let mut bad = pairs.to_vec();
        bad[2] = ("SLURM_LOCALID", "4");
        assert!(error(&bad).contains("SLURM_LOCALID=4 must be below SLURM_NTASKS_PER_NODE=4"));
        let no_port: Vec<_> = pairs.iter().copied().filter(|(k, _)| *k != "MASTER_PORT").collect();
        assert!(error(&no_port).contains("MASTER_PORT is not set"));
    }

    #[test]
    fn first_host_of_slurm_node_lists() {
        assert_eq!(first_host("node7").unwrap(), "node7");
        assert_eq!(first_host("node[01-04,07]").unwrap(), "node01");
        assert_eq!(first_host("a,b[1-2]").unwrap(), "a");
        assert_eq!(first_host("gpu[3,5]-ib,cpu1").unwrap(), "gpu3-ib");
        assert!(first_host("").is_err());
        assert!(first_host("n[x-y]").unwrap_err().to_string().contains("MASTER_ADDR"));
        assert!(first_host("r[1-2]n[3-4]").is_err());
        assert!(first_host("n[1-2").is_err());
    }
}
