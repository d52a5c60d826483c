//! Gathering and scattering rows: the CUDA backend against the CPU, bit for bit, and the host-side
//! checks of the row indices.

use rand::Rng;
use safedpo::backend::cuda::{Device, Precision};
use safedpo::backend::prelude::*;

use crate::common::*;
use crate::device::Fixture;

// ---- the CUDA backend against the CPU (see `device`) -----------------------------------------------------

/// `gather_rows` and `scatter_rows` are exact copies: bit-identical to the CPU in both modes. Random
/// row subsets (increasing), none (m = 0) and all (m = n); c below, at and above a block's width.
fn rows(device: &Device, precision: Precision) {
    let mut f = Fixture::new(device, precision, 12);
    for (n, c, keep) in [(37, 40, 0.6), (5, 1, 0.5), (20, 300, 0.3), (9, 32, 0.0), (9, 32, 1.0), (1, 7, 1.0)] {
        let rows: Vec<i32> = (0..n as i32).filter(|_| f.rng.random_bool(keep)).collect();
        let m = rows.len();
        let (cr, gr) = (f.cpu.upload_ids(&rows).unwrap(), f.cuda.upload_ids(&rows).unwrap());
        let what = |op: &str| format!("{op} n={n} c={c} m={m} ({precision})");

        let (ci, gi) = f.fresh(n * c, 1.0);
        let (mut want, mut got) = f.poisoned(m * c);
        f.cpu.gather_rows(&mut want, &ci, &cr, m, n, c).unwrap();
        f.cuda.gather_rows(&mut got, &gi, &gr, m, n, c).unwrap();
        assert_bitwise_eq(&what("gather_rows"), &f.cuda.download(&got).unwrap(), &want);

        let (cd, gd) = f.fresh(m * c, 1.0);
        let (mut want, mut got) = f.poisoned(n * c);
        f.cpu.scatter_rows(&mut want, &cd, &cr, m, n, c).unwrap();
        f.cuda.scatter_rows(&mut got, &gd, &gr, m, n, c).unwrap();
        assert_bitwise_eq(&what("scatter_rows"), &f.cuda.download(&got).unwrap(), &want);
    }
    // The host-side checks: rows must increase and lie in 0..n.
    let (inp, mut out) = (f.cuda.zeros(4 * 3).unwrap(), f.cuda.zeros(2 * 3).unwrap());
    for (bad, expect) in [([2, 1], "strictly increasing"), ([1, 1], "strictly increasing"), ([0, 4], "rows[1]")] {
        let rows = f.cuda.upload_ids(&bad).unwrap();
        let err = f.cuda.gather_rows(&mut out, &inp, &rows, 2, 4, 3).unwrap_err().to_string();
        assert!(err.contains("gather_rows") && err.contains(expect), "{err}");
        let mut dinp = f.cuda.zeros(4 * 3).unwrap();
        let err = f.cuda.scatter_rows(&mut dinp, &out, &rows, 2, 4, 3).unwrap_err().to_string();
        assert!(err.contains("scatter_rows") && err.contains(expect), "{err}");
    }
}

device_tests!(rows);
