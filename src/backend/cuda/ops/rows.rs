//! Row selection on the CUDA backend (kernels/rows.cu): one block per output row, a thread per 128-bit
//! pack of it, exact copies in the input's storage type.

use anyhow::Result;

use crate::backend::cuda::backend::{CudaBackend, CudaBuf, CudaIds};
use crate::backend::cuda::launch::{grid_dim, i32_arg, row_threads, suffix, vec_width};
use crate::backend::cuda::LaunchConfig;
use crate::backend::{checks, RowOps};

impl RowOps for CudaBackend {
    // Exact copies: the output takes the input's storage type (see kernels/rows.cu).
    fn gather_rows(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        rows: &CudaIds,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::gather_rows(out.len(), inp.len(), &rows.host, m, n, c)?;
        if m == 0 {
            return Ok(());
        }
        let dt = inp.dtype();
        let inp = self.input(inp, dt)?;
        let out = self.output(out, dt, false)?;
        self.launch(
            &format!("gather_rows_{}", suffix(dt)),
            LaunchConfig::grid_1d(grid_dim(m, "rows")?, row_threads(c.div_ceil(vec_width(dt)))),
            &[out.arg(), inp.arg(), rows.arg(), i32_arg(c, "c")?],
        )
    }

    fn scatter_rows(
        &self,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        rows: &CudaIds,
        m: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        checks::scatter_rows(dinp.len(), dout.len(), &rows.host, m, n, c)?;
        if n == 0 {
            return Ok(());
        }
        let dt = dout.dtype();
        let dout = self.input(dout, dt)?;
        let dinp = self.output(dinp, dt, false)?;
        self.launch(
            &format!("scatter_rows_{}", suffix(dt)),
            LaunchConfig::grid_1d(grid_dim(n, "rows")?, row_threads(c.div_ceil(vec_width(dt)))),
            &[dinp.arg(), dout.arg(), rows.arg(), i32_arg(m, "m")?, i32_arg(c, "c")?],
        )
    }
}
