"""Triton kernels for the GPU LM runtime: fused residual-add + RMSNorm, the causal conv and the
selective scan, each reading and writing the recurrent state in place through a row index.

Why our own kernels: a decode step of Mamba-2.8B is ~600 tiny launches in transformers, so it is
launch-bound (~50 ms/token); with the state update fused into three kernels per layer the step is a
handful of launches per layer and fits in a CUDA graph. The row index lets one captured graph serve
any set of branches (rows of the state pool), so forking a branch never re-captures anything.
The scan kernel takes a chunk of L tokens from a live state, which mamba-ssm's ``selective_scan_fn``
cannot (it always starts from zero).

Semantics are those of ``duplex/runtime.py`` (transformers' Mamba-1 mixer); rounding follows it at
the points that matter (bf16 input of each RMSNorm, bf16 conv output), the rest is fp32 math.
Triton is imported only when a kernel is first needed (never at package import). With
``TRITON_INTERPRET=1`` set before the first call the kernels run on CPU tensors (tests).
"""
from __future__ import annotations

import functools
import os
import types

import torch


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile-on-first-use namespace of the Triton kernels (imports Triton lazily)."""
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def add_rmsnorm(res_ptr, delta_ptr, w_ptr, out_ptr, zero_ptr, hidden, n_zero, stride_res, stride_delta,
                    stride_out, stride_zero, eps, HAS_DELTA: tl.constexpr, ROUND_INPUT: tl.constexpr,
                    BLOCK: tl.constexpr, ZERO_BLOCK: tl.constexpr, PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
        if PDL_EARLY:
            gdc_launch_dependents()
        if PDL:
            gdc_wait()  # everything below reads or clears what earlier kernels write or read
        row = tl.program_id(0)
        if ZERO_BLOCK > 0:  # clear this row of the x_proj accumulator the fused decode conv adds into
            zcols = tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + row * stride_zero + zcols, tl.zeros([ZERO_BLOCK], dtype=tl.float32),
                     mask=zcols < n_zero)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            res += tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(res_ptr + row * stride_res + cols, res, mask=mask)
        if ROUND_INPUT:  # transformers feeds each block's norm the residual cast to the model dtype
            res = res.to(w_ptr.dtype.element_ty).to(tl.float32)
        var = tl.sum(res * res, axis=0) / hidden
        normed = res * tl.rsqrt(var + eps)
        if ROUND_INPUT:  # the norm casts back to its input dtype before scaling
            normed = normed.to(w_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def conv4_silu(x_ptr, state_ptr, rows_ptr, new_rows_ptr, snap_rows_ptr, snap_pos_ptr, end_pos_ptr, w_ptr, b_ptr,
                   out_ptr, seq_len, d_inner, stride_xb, stride_xl, stride_sr, stride_sd, stride_ob, stride_ol,
                   HAS_BIAS: tl.constexpr, HAS_SNAP: tl.constexpr, HAS_END: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_L: tl.constexpr, PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
        if PDL_EARLY:
            gdc_launch_dependents()
        b = tl.program_id(0)
        snap_at = 0
        if HAS_SNAP:  # per row: 0 = no snapshot
            snap_at = tl.load(snap_pos_ptr + b).to(tl.int32)
        end = seq_len
        if HAS_END:  # per row: its real length (right padding beyond; the final state is taken there)
            end = tl.load(end_pos_ptr + b).to(tl.int32)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = d < d_inner
        srow = state_ptr + tl.load(rows_ptr + b) * stride_sr + d * stride_sd  # indices: inputs, before the wait
        if PDL:
            gdc_wait()
        bias = tl.zeros([1, BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + d, mask=mask, other=0.0).to(tl.float32)[None, :]
        xrow = x_ptr + b * stride_xb + d[None, :]
        # All positions of a (BLOCK_L, BLOCK_D) tile at once (a serial loop over positions paid one load
        # latency per token): output t reads inputs t-3..t, an input p < 0 before the chunk being old
        # state entry 4 + p (entry 3 the newest).
        for l0 in range(0, seq_len, BLOCK_L):
            t = l0 + tl.arange(0, BLOCK_L)
            tmask = (t < seq_len)[:, None] & mask[None, :]  # (BLOCK_L, BLOCK_D)
            acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
            for k in tl.static_range(4):  # tap k reads input t - 3 + k
                p = (t - 3 + k)[:, None]
                v = tl.where(p >= 0, tl.load(xrow + p * stride_xl, mask=tmask & (p >= 0), other=0.0)
                             .to(state_ptr.dtype.element_ty),
                             tl.load(srow[None, :] + (4 + p), mask=tmask & (p < 0), other=0.0))
                wk = tl.load(w_ptr + d * 4 + k, mask=mask, other=0.0).to(tl.float32)[None, :]
                acc += wk * v.to(tl.float32)
            acc = (acc + bias).to(out_ptr.dtype.element_ty).to(tl.float32)  # the conv output is model dtype
            y = acc / (1.0 + tl.exp(-acc))
            tl.store(out_ptr + b * stride_ob + t[:, None] * stride_ol + d[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=tmask)
        # New state = the last 4 inputs of (old state || chunk) up to the row's end (seq_len unless HAS_END):
        # entry k is input end - 4 + k, or old entry k + end. It goes to row new_rows[b] (rows[b]: in place); with snap_at = snap_pos[b] > 0
        # the state after the first snap_at inputs goes to row snap_rows[b] (which may be rows[b]). Every
        # entry is loaded before any is stored: a vector can be replicated over threads, and one replica's
        # store must not overtake another's load of the same old entry.
        k = tl.arange(0, 4)
        xcol = x_ptr + b * stride_xb + d[:, None]  # (BLOCK_D, 1) pointers
        srow2 = srow[:, None]
        mask2 = mask[:, None] & (k >= 0)[None, :]  # (BLOCK_D, 4)
        j = end - 4 + k  # (4,) chunk position of each final entry (< 0: an old entry)
        final = tl.where(j[None, :] >= 0,
                         tl.load(xcol + j[None, :] * stride_xl, mask=mask2 & (j >= 0)[None, :], other=0.0)
                         .to(state_ptr.dtype.element_ty),
                         tl.load(srow2 + (k + end)[None, :], mask=mask2 & (j < 0)[None, :], other=0.0))
        has_snap = snap_at > 0
        j = snap_at - 4 + k
        snap = tl.where(j[None, :] >= 0,
                        tl.load(xcol + j[None, :] * stride_xl, mask=mask2 & (j >= 0)[None, :] & has_snap, other=0.0)
                        .to(state_ptr.dtype.element_ty),
                        tl.load(srow2 + (k + snap_at)[None, :], mask=mask2 & (j < 0)[None, :] & has_snap, other=0.0))
        tl.debug_barrier()
        nrow = state_ptr + tl.load(new_rows_ptr + b) * stride_sr + d * stride_sd
        tl.store(nrow[:, None] + k[None, :], final, mask=mask2)  # (BLOCK_D, 4)
        prow = state_ptr + tl.load(snap_rows_ptr + b) * stride_sr + d * stride_sd
        tl.store(prow[:, None] + k[None, :], snap, mask=mask2 & has_snap)

    @triton.jit
    def conv_load(x_ptr, srow, b, d, mask, stride_xb):
        # the old state entries 1-3 and the new input of row b (state row pointers ``srow``)
        s1 = tl.load(srow + 1, mask=mask, other=0.0)
        s2 = tl.load(srow + 2, mask=mask, other=0.0)
        s3 = tl.load(srow + 3, mask=mask, other=0.0)
        x = tl.load(x_ptr + b * stride_xb + d, mask=mask, other=0.0).to(s1.dtype)
        return s1, s2, s3, x

    @triton.jit
    def conv_finish(srow, s1, s2, s3, x, out_ptr, b, d, mask, w0, w1, w2, w3, bias, stride_ob):
        # conv + SiLU of one decode token from conv_load's values; stores the output (model dtype) and
        # the shifted state, returns the output as fp32 of the stored value
        acc = w0 * s1.to(tl.float32) + w1 * s2.to(tl.float32) + w2 * s3.to(tl.float32) \
            + w3 * x.to(tl.float32) + bias
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # the conv output is model dtype
        y = (acc / (1.0 + tl.exp(-acc))).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * stride_ob + d, y, mask=mask)
        tl.store(srow + 0, s1, mask=mask)
        tl.store(srow + 1, s2, mask=mask)
        tl.store(srow + 2, s3, mask=mask)
        tl.store(srow + 3, x, mask=mask)
        return y.to(tl.float32)

    @triton.jit
    def conv_row(x_ptr, srow, out_ptr, b, d, mask, w0, w1, w2, w3, bias, stride_xb, stride_ob):
        # one decode token of row b: conv + SiLU from its state row ``srow`` (shifted in place)
        s1, s2, s3, x = conv_load(x_ptr, srow, b, d, mask, stride_xb)
        # A BLOCK_D-long vector is replicated over the program's threads; without this barrier one
        # replica's store of the shifted state can overtake another replica's load (a race seen on
        # an H100 as run-to-run varying errors).
        tl.debug_barrier()
        return conv_finish(srow, s1, s2, s3, x, out_ptr, b, d, mask, w0, w1, w2, w3, bias, stride_ob)

    # Triton's interpreter re-reads a kernel's source and resolves helpers among the module's globals,
    # not the closure (compiled kernels see both).
    globals().update(conv_load=conv_load, conv_finish=conv_finish, conv_row=conv_row)

    @triton.jit
    def conv4_silu_xproj(x_ptr, state_ptr, rows_ptr, w_ptr, b_ptr, out_ptr, wx_ptr, acc_ptr, d_inner,
                         n_proj, stride_xb, stride_sr, stride_sd, stride_ob, stride_wx, stride_acc,
                         BATCH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                         PROJ_BLOCK: tl.constexpr, JOIN: tl.constexpr, PDL: tl.constexpr,
                         PDL_EARLY: tl.constexpr):
        if PDL_EARLY:  # let the next kernel start loading its weights now
            gdc_launch_dependents()
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = d < d_inner
        p = tl.arange(0, PROJ_BLOCK)
        pmask = p < n_proj
        w0 = tl.load(w_ptr + d * 4 + 0, mask=mask, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + d * 4 + 1, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + d * 4 + 2, mask=mask, other=0.0).to(tl.float32)
        w3 = tl.load(w_ptr + d * 4 + 3, mask=mask, other=0.0).to(tl.float32)
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + d, mask=mask, other=0.0).to(tl.float32)
        wx = tl.load(wx_ptr + p[:, None] * stride_wx + d[None, :], mask=pmask[:, None] & mask[None, :],
                     other=0.0).to(tl.float32)  # (PROJ_BLOCK, BLOCK_D) columns of x_proj, read once for all rows
        # The state rows' addresses before the wait too (the row index is the caller's input, written
        # before the graph runs): after it, the first loads are the state and the input themselves.
        srow_a = state_ptr + tl.load(rows_ptr) * stride_sr + d * stride_sd
        srow_b = srow_a
        if BATCH > 1:
            srow_b = state_ptr + tl.load(rows_ptr + 1) * stride_sr + d * stride_sd
        if PDL:  # everything above is weights and indices; from here on, data the previous kernel writes
            gdc_wait()
        if JOIN:  # two rows: every load before one barrier, both x_proj shares in one reduction and one
            # (PROJ_BLOCK, 2) atomic add
            a1, a2, a3, xa = conv_load(x_ptr, srow_a, 0, d, mask, stride_xb)
            b1, b2, b3, xb = conv_load(x_ptr, srow_b, 1, d, mask, stride_xb)
            tl.debug_barrier()  # as in conv_row
            ya = conv_finish(srow_a, a1, a2, a3, xa, out_ptr, 0, d, mask, w0, w1, w2, w3, bias, stride_ob)
            yb = conv_finish(srow_b, b1, b2, b3, xb, out_ptr, 1, d, mask, w0, w1, w2, w3, bias, stride_ob)
            parts = tl.sum(tl.join(wx * ya[None, :], wx * yb[None, :]), axis=1)  # (PROJ_BLOCK, 2)
            two = tl.arange(0, 2)
            tl.atomic_add(acc_ptr + two[None, :] * stride_acc + p[:, None], parts, mask=pmask[:, None])
        else:
            for b in tl.static_range(BATCH):  # unrolled: the rows' loads overlap
                if b == 0:
                    srow = srow_a
                elif b == 1:
                    srow = srow_b
                else:
                    srow = state_ptr + tl.load(rows_ptr + b) * stride_sr + d * stride_sd
                y = conv_row(x_ptr, srow, out_ptr, b, d, mask, w0, w1, w2, w3, bias, stride_xb, stride_ob)
                part = tl.sum(wx * y[None, :], axis=1)  # (PROJ_BLOCK,) split-K share of x_proj
                tl.atomic_add(acc_ptr + b * stride_acc + p, part, mask=pmask)

    @triton.jit
    def selective_scan(x_ptr, dtlow_ptr, wdt_ptr, dt_ptr, dt_bias_ptr, a_ptr, bmat_ptr, cmat_ptr, dskip_ptr, z_ptr,
                       state_ptr, rows_ptr, new_rows_ptr, snap_rows_ptr, snap_pos_ptr, end_pos_ptr, out_ptr, seq_len,
                       d_inner, rank, stride_xb, stride_xl, stride_tb, stride_tl, stride_db, stride_dl, stride_bb,
                       stride_bl, stride_cb, stride_cl, stride_zb, stride_zl, stride_sr, stride_sd,
                       stride_ob, stride_ol, N: tl.constexpr, RANK_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                       FUSED_DT: tl.constexpr, HAS_SNAP: tl.constexpr, HAS_END: tl.constexpr, PDL: tl.constexpr,
                       PDL_EARLY: tl.constexpr):
        if PDL_EARLY:
            gdc_launch_dependents()
        b = tl.program_id(0)
        snap_at = 0
        if HAS_SNAP:  # per row: 0 = no snapshot
            snap_at = tl.load(snap_pos_ptr + b).to(tl.int32)
        end = seq_len
        if HAS_END:  # per row: its real length; padding beyond it has time step 0 (the state stays)
            end = tl.load(end_pos_ptr + b).to(tl.int32)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, N)
        r = tl.arange(0, RANK_BLOCK)
        mask = d < d_inner
        mask2 = mask[:, None]
        rmask = r < rank
        a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=mask2, other=0.0)
        if FUSED_DT:  # (BLOCK_D, RANK_BLOCK) rows of dt_proj, read once per program
            wdt = tl.load(wdt_ptr + d[:, None] * rank + r[None, :], mask=mask2 & rmask[None, :],
                          other=0.0).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + d, mask=mask, other=0.0).to(tl.float32)
        dskip = tl.load(dskip_ptr + d, mask=mask, other=0.0).to(tl.float32)
        # the state row (an input index, not written by earlier kernels) before the wait as well
        sptr = state_ptr + tl.load(rows_ptr + b) * stride_sr + d[:, None] * stride_sd + n[None, :]
        if PDL:  # weights and indices above, state and activations below
            gdc_wait()
        h = tl.load(sptr, mask=mask2, other=0.0)  # (BLOCK_D, N) fp32
        for t in range(seq_len):
            x = tl.load(x_ptr + b * stride_xb + t * stride_xl + d, mask=mask, other=0.0).to(tl.float32)
            if FUSED_DT:  # dt_proj here: one launch less per layer (each program re-reads its W rows)
                low = tl.load(dtlow_ptr + b * stride_tb + t * stride_tl + r, mask=rmask, other=0.0)
                low = low.to(out_ptr.dtype.element_ty).to(tl.float32)
                dt = tl.sum(wdt * low[None, :], axis=1)
                dt = dt.to(out_ptr.dtype.element_ty).to(tl.float32)  # the projection is model dtype
            else:
                dt = tl.load(dt_ptr + b * stride_db + t * stride_dl + d, mask=mask, other=0.0).to(tl.float32)
            dt = dt + dt_bias
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, torch's threshold
            if HAS_END:
                dt = tl.where(t < end, dt, 0.0)  # padding: exp(0 * A) = 1 and no input
            # x_proj's outputs are model dtype (rounds the fused decode path's fp32 accumulator)
            bv = tl.load(bmat_ptr + b * stride_bb + t * stride_bl + n).to(out_ptr.dtype.element_ty).to(tl.float32)
            cv = tl.load(cmat_ptr + b * stride_cb + t * stride_cl + n).to(out_ptr.dtype.element_ty).to(tl.float32)
            h = h * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * bv[None, :]
            y = tl.sum(h * cv[None, :], axis=1) + dskip * x
            z = tl.load(z_ptr + b * stride_zb + t * stride_zl + d, mask=mask, other=0.0).to(tl.float32)
            y = y * (z / (1.0 + tl.exp(-z)))
            tl.store(out_ptr + b * stride_ob + t * stride_ol + d, y.to(out_ptr.dtype.element_ty), mask=mask)
            if t == snap_at - 1:  # the state after the first snap_at tokens, to row snap_rows[b]
                tl.debug_barrier()  # all replicas have read the initial state (snap row may be rows[b])
                tl.store(state_ptr + tl.load(snap_rows_ptr + b) * stride_sr + d[:, None] * stride_sd + n[None, :],
                         h, mask=mask2)
        tl.debug_barrier()
        tl.store(state_ptr + tl.load(new_rows_ptr + b) * stride_sr + d[:, None] * stride_sd + n[None, :], h,
                 mask=mask2)

    @triton.jit
    def selective_scan_dot(x_ptr, dtlow_ptr, wdt_ptr, dt_bias_ptr, a_ptr, bmat_ptr, cmat_ptr, dskip_ptr, z_ptr,
                           state_ptr, rows_ptr, out_ptr, batch, d_inner, rank, stride_xb, stride_tb, stride_bb,
                           stride_cb, stride_zb, stride_sr, stride_sd, stride_ob, N: tl.constexpr,
                           RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr, PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
        # One decode token of many rows: dt_proj on tensor cores for a (BLOCK_M rows, BLOCK_D channels)
        # block (each program reads its dt_proj rows once for BLOCK_M rows, not once per row as
        # selective_scan's fused dt does), then the scan step, D skip and SiLU(z) gate of that block.
        if PDL_EARLY:
            gdc_launch_dependents()
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, N)
        r = tl.arange(0, RANK_BLOCK)
        mmask = m < batch
        dmask = d < d_inner
        mask = mmask[:, None] & dmask[None, :]  # (BLOCK_M, BLOCK_D)
        mask3 = mask[:, :, None]  # (BLOCK_M, BLOCK_D, 1)
        a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=dmask[:, None], other=0.0)  # (BLOCK_D, N)
        wdt = tl.load(wdt_ptr + d[None, :] * rank + r[:, None], mask=(r < rank)[:, None] & dmask[None, :],
                      other=0.0)  # (RANK_BLOCK, BLOCK_D) slice of dt_proj^T
        dt_bias = tl.load(dt_bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        dskip = tl.load(dskip_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        row = tl.load(rows_ptr + m, mask=mmask, other=0)  # state rows: inputs, before the wait
        sptr = state_ptr + row[:, None, None] * stride_sr + d[None, :, None] * stride_sd + n[None, None, :]
        if PDL:
            gdc_wait()
        h = tl.load(sptr, mask=mask3, other=0.0)  # (BLOCK_M, BLOCK_D, N) fp32
        low = tl.load(dtlow_ptr + m[:, None] * stride_tb + r[None, :], mask=mmask[:, None] & (r < rank)[None, :],
                      other=0.0).to(out_ptr.dtype.element_ty)  # (BLOCK_M, RANK_BLOCK), x_proj output rounded
        dt = tl.dot(low.to(wdt.dtype), wdt, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
        dt = dt.to(out_ptr.dtype.element_ty).to(tl.float32) + dt_bias[None, :]  # the projection is model dtype
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, torch's threshold
        x = tl.load(x_ptr + m[:, None] * stride_xb + d[None, :], mask=mask, other=0.0).to(tl.float32)
        bv = tl.load(bmat_ptr + m[:, None] * stride_bb + n[None, :], mask=mmask[:, None], other=0.0)
        cv = tl.load(cmat_ptr + m[:, None] * stride_cb + n[None, :], mask=mmask[:, None], other=0.0)
        bv = bv.to(out_ptr.dtype.element_ty).to(tl.float32)  # (BLOCK_M, N), x_proj outputs are model dtype
        cv = cv.to(out_ptr.dtype.element_ty).to(tl.float32)
        h = h * tl.exp(dt[:, :, None] * a[None, :, :]) + (dt * x)[:, :, None] * bv[:, None, :]
        y = tl.sum(h * cv[:, None, :], axis=2) + dskip[None, :] * x  # (BLOCK_M, BLOCK_D)
        z = tl.load(z_ptr + m[:, None] * stride_zb + d[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y * (z / (1.0 + tl.exp(-z)))
        tl.store(out_ptr + m[:, None] * stride_ob + d[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(sptr, h, mask=mask3)

    @triton.jit
    def skinny_matmul(x_ptr, w_ptr, out_ptr, rows, n_out, n_in, stride_xm, stride_wn, stride_om, k_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ADD: tl.constexpr,
                      PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
        # out[:rows] (=|+=) x @ W^T for one (BLOCK_N outputs, K share) tile, all rows in one tl.dot tile.
        # ADD: fp32 atomics into out (split-K over program_id(1)); else a plain store (one K share).
        if PDL_EARLY:
            gdc_launch_dependents()
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = tl.program_id(1) * k_per_split
        k_end = k_start + k_per_split  # this program's share of K (n_in is a multiple of it)
        m = tl.arange(0, BLOCK_M)
        nmask = n < n_out
        mmask = m < rows
        k = k_start + tl.arange(0, BLOCK_K)
        # The first weight tile before the wait: with PDL it streams while the previous kernel finishes.
        w = tl.load(w_ptr + n[None, :] * stride_wn + k[:, None], mask=nmask[None, :] & (k < k_end)[:, None],
                    other=0.0)  # (BLOCK_K, BLOCK_N) slice of W^T
        if PDL:
            gdc_wait()
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k < k_end)[None, :],
                    other=0.0).to(w.dtype)  # (BLOCK_M, BLOCK_K); fp32 inputs rounded like x.to(W.dtype)
        acc = tl.dot(x, w)
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + n[None, :] * stride_wn + k[:, None], mask=nmask[None, :] & (k < k_end)[:, None],
                        other=0.0)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k < k_end)[None, :],
                        other=0.0).to(w.dtype)
            acc += tl.dot(x, w)
        out = out_ptr + m[:, None] * stride_om + n[None, :]
        if ADD:
            tl.atomic_add(out, acc, mask=mmask[:, None] & nmask[None, :])
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def widen(w, m: tl.constexpr):
        # bf16 -> fp32 for row m of an unrolled GEMV. Odd rows convert by shifting the bits (exact), so
        # the compiler cannot merge the rows' conversions into one fp32 copy of the weight tile that stays
        # live across rows (two rows: 228 instead of 128 registers; bench/kernel_regs.py).
        if m % 2 == 1 and w.dtype == tl.bfloat16:
            return (w.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return w.to(tl.float32)

    @triton.jit
    def in_proj_tile(w_ptr, norm_ptr, n, n_out, stride_w, hidden, K1: tl.constexpr, K2: tl.constexpr):
        # The (BLOCK_N, hidden) weight tile of outputs n and the norm weight, as (K1) and (K2) parts
        # (hidden = K1 + up to K2, both powers of two: 2560 = 2048 + 512; without K2 the second part
        # repeats the first and is never used). Loaded before the PDL wait: it streams while the
        # previous kernel (the last layer's out_proj) is still running.
        k1 = tl.arange(0, K1)
        k1mask = k1 < hidden
        w1 = tl.load(w_ptr + n[:, None] * stride_w + k1[None, :], mask=(n < n_out)[:, None] & k1mask[None, :],
                     other=0.0)
        g1 = tl.load(norm_ptr + k1, mask=k1mask, other=0.0).to(tl.float32)
        k2, k2mask, w2, g2 = k1, k1mask, w1, g1
        if K2 > 0:
            k2 = K1 + tl.arange(0, K2)
            k2mask = k2 < hidden
            w2 = tl.load(w_ptr + n[:, None] * stride_w + k2[None, :], mask=(n < n_out)[:, None] & k2mask[None, :],
                         other=0.0)
            g2 = tl.load(norm_ptr + k2, mask=k2mask, other=0.0).to(tl.float32)
        return w1, w2, g1, g2, k1, k1mask, k2, k2mask

    @triton.jit
    def clear_rows(zero_ptr, pid, n_zero, stride_zero, ROWS: tl.constexpr, ZERO_BLOCK: tl.constexpr):
        if ZERO_BLOCK > 0:  # program 0 clears the x_proj accumulator the conv kernel adds into
            if pid == 0:
                zcols = tl.arange(0, ZERO_BLOCK)
                for m in tl.static_range(ROWS):
                    tl.store(zero_ptr + m * stride_zero + zcols, tl.zeros([ZERO_BLOCK], dtype=tl.float32),
                             mask=zcols < n_zero)

    @triton.jit
    def normed_row(res_ptr, m, stride_res, k1, k1mask, g1, k2, k2mask, g2, hidden, eps, dtype: tl.constexpr,
                   K2: tl.constexpr):
        # transformers' block norm of residual row m: cast to the model dtype, normalised in fp32, cast
        # back, scaled by the norm weight, in the model dtype: (K1,) and (K2,) parts
        r1 = tl.load(res_ptr + m * stride_res + k1, mask=k1mask, other=0.0).to(dtype).to(tl.float32)
        sq = tl.sum(r1 * r1, axis=0)
        r2 = r1
        if K2 > 0:
            r2 = tl.load(res_ptr + m * stride_res + k2, mask=k2mask, other=0.0).to(dtype).to(tl.float32)
            sq += tl.sum(r2 * r2, axis=0)
        inv = tl.rsqrt(sq / hidden + eps)
        x1 = ((r1 * inv).to(dtype).to(tl.float32) * g1).to(dtype)
        x2 = ((r2 * inv).to(dtype).to(tl.float32) * g2).to(dtype)
        return x1, x2

    @triton.jit
    def tile_dot(w1, w2, x1, x2, m: tl.constexpr, K2: tl.constexpr):
        acc = tl.sum(widen(w1, m) * x1.to(tl.float32)[None, :], axis=1)  # (BLOCK_N,)
        if K2 > 0:
            acc += tl.sum(widen(w2, m) * x2.to(tl.float32)[None, :], axis=1)
        return acc

    # for the interpreter, as conv_row
    globals().update(widen=widen, in_proj_tile=in_proj_tile, clear_rows=clear_rows, normed_row=normed_row,
                     tile_dot=tile_dot)

    @triton.jit
    def rmsnorm_gemv(res_ptr, norm_ptr, w_ptr, out_ptr, zero_ptr, n_out, hidden, n_zero,
                     stride_res, stride_w, stride_out, stride_zero, eps, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                     K1: tl.constexpr, K2: tl.constexpr, ZERO_BLOCK: tl.constexpr, PDL: tl.constexpr,
                     PDL_EARLY: tl.constexpr):
        if PDL_EARLY:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < n_out
        # the program's whole weight tile in registers before the wait
        w1, w2, g1, g2, k1, k1mask, k2, k2mask = in_proj_tile(w_ptr, norm_ptr, n, n_out, stride_w, hidden, K1, K2)
        if PDL:
            gdc_wait()
        clear_rows(zero_ptr, pid, n_zero, stride_zero, ROWS, ZERO_BLOCK)
        for m in tl.static_range(ROWS):  # unrolled: the rows' loads and reductions overlap
            # transformers' block norm of row m, then in_proj of it (model dtype) with fp32 accumulation
            x1, x2 = normed_row(res_ptr, m, stride_res, k1, k1mask, g1, k2, k2mask, g2, hidden, eps,
                                w_ptr.dtype.element_ty, K2)
            tl.store(out_ptr + m * stride_out + n, tile_dot(w1, w2, x1, x2, m, K2).to(out_ptr.dtype.element_ty),
                     mask=nmask)


    @triton.jit
    def rmsnorm_gemv_loop(res_ptr, norm_ptr, w_ptr, out_ptr, zero_ptr, n_out, hidden, n_zero,
                          stride_res, stride_w, stride_out, stride_zero, eps, ROWS: tl.constexpr,
                          BLOCK_N: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, ZERO_BLOCK: tl.constexpr,
                          JOIN: tl.constexpr, PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
        # Persistent variant of rmsnorm_gemv for 1 or 2 rows: a fixed grid of programs, each normalises
        # the rows once and then walks output tiles pid, pid + P, ... (each tile's weights loaded one
        # tile ahead), so the per-tile work after the wait is only the dot, not the norm.
        if PDL_EARLY:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        step = tl.num_programs(0)
        dtype = w_ptr.dtype.element_ty
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        # the first tile before the wait
        w1, w2, g1, g2, k1, k1mask, k2, k2mask = in_proj_tile(w_ptr, norm_ptr, n, n_out, stride_w, hidden, K1, K2)
        if PDL:
            gdc_wait()
        clear_rows(zero_ptr, pid, n_zero, stride_zero, ROWS, ZERO_BLOCK)
        xa1, xa2 = normed_row(res_ptr, 0, stride_res, k1, k1mask, g1, k2, k2mask, g2, hidden, eps, dtype, K2)
        xb1, xb2 = xa1, xa2
        if ROWS == 2:
            xb1, xb2 = normed_row(res_ptr, 1, stride_res, k1, k1mask, g1, k2, k2mask, g2, hidden, eps, dtype, K2)
        for tile in range(pid, tl.cdiv(n_out, BLOCK_N), step):
            # the next tile's weights are loaded before this tile's dot (double buffering by hand: Triton
            # does not pipeline loads that feed no tl.dot)
            nxt = (tile + step) * BLOCK_N + tl.arange(0, BLOCK_N)
            v1 = tl.load(w_ptr + nxt[:, None] * stride_w + k1[None, :],
                         mask=(nxt < n_out)[:, None] & k1mask[None, :], other=0.0)
            v2 = v1
            if K2 > 0:
                v2 = tl.load(w_ptr + nxt[:, None] * stride_w + k2[None, :],
                             mask=(nxt < n_out)[:, None] & k2mask[None, :], other=0.0)
            n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            if JOIN:  # both rows' products in one reduction: one cross-warp exchange instead of two
                acc = tl.sum(tl.join(widen(w1, 0) * xa1.to(tl.float32)[None, :],
                                     widen(w1, 1) * xb1.to(tl.float32)[None, :]), axis=1)  # (BLOCK_N, 2)
                if K2 > 0:
                    acc += tl.sum(tl.join(widen(w2, 0) * xa2.to(tl.float32)[None, :],
                                          widen(w2, 1) * xb2.to(tl.float32)[None, :]), axis=1)
                acc_a, acc_b = tl.split(acc)
                tl.store(out_ptr + n, acc_a.to(out_ptr.dtype.element_ty), mask=n < n_out)
                tl.store(out_ptr + stride_out + n, acc_b.to(out_ptr.dtype.element_ty), mask=n < n_out)
            else:
                tl.store(out_ptr + n, tile_dot(w1, w2, xa1, xa2, 0, K2).to(out_ptr.dtype.element_ty), mask=n < n_out)
                if ROWS == 2:
                    tl.store(out_ptr + stride_out + n,
                             tile_dot(w1, w2, xb1, xb2, 1, K2).to(out_ptr.dtype.element_ty), mask=n < n_out)
            w1, w2 = v1, v2

    @triton.jit
    def gemv_add(x_ptr, w_ptr, out_ptr, n_out, n_in, stride_x, stride_w, stride_out,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, JOIN: tl.constexpr,
                 PDL: tl.constexpr, PDL_EARLY: tl.constexpr):
        if PDL_EARLY:
            gdc_launch_dependents()
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        nmask = n < n_out
        kmask = k < n_in
        w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_K) weight tile, before the wait
        if PDL:
            gdc_wait()
        if JOIN:  # two rows: one reduction of both rows' products, one (BLOCK_N, 2) atomic add
            xa = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
            xb = tl.load(x_ptr + stride_x + k, mask=kmask, other=0.0).to(tl.float32)
            acc = tl.sum(tl.join(widen(w, 0) * xa[None, :], widen(w, 1) * xb[None, :]), axis=1)  # (BLOCK_N, 2)
            two = tl.arange(0, 2)
            tl.atomic_add(out_ptr + two[None, :] * stride_out + n[:, None], acc, mask=nmask[:, None])
        else:
            for m in tl.static_range(ROWS):
                x = tl.load(x_ptr + m * stride_x + k, mask=kmask, other=0.0).to(tl.float32)
                tl.atomic_add(out_ptr + m * stride_out + n, tl.sum(widen(w, m) * x[None, :], axis=1), mask=nmask)

    return types.SimpleNamespace(add_rmsnorm=add_rmsnorm, conv4_silu=conv4_silu, selective_scan=selective_scan,
                                 selective_scan_dot=selective_scan_dot,
                                 skinny_matmul=skinny_matmul, conv4_silu_xproj=conv4_silu_xproj,
                                 rmsnorm_gemv=rmsnorm_gemv, rmsnorm_gemv_loop=rmsnorm_gemv_loop, gemv_add=gemv_add)


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out: torch.Tensor, round_input: bool = True, zero: torch.Tensor | None = None,
                pdl: bool = False) -> torch.Tensor:
    """``residual += delta`` (fp32, in place) then ``out = RMSNorm(residual) * weight``; rows are (M, H).

    ``zero`` (M, P) fp32, optional, is cleared on the way (the accumulator of ``causal_conv_silu_xproj``).
    """
    kernel = _kernels().add_rmsnorm
    rows, hidden = residual.shape
    kernel[(rows,)](residual, residual if delta is None else delta, weight, out, residual if zero is None else zero,
                    hidden, 0 if zero is None else zero.shape[1], residual.stride(0),
                    0 if delta is None else delta.stride(0), out.stride(0), 0 if zero is None else zero.stride(0),
                    eps, HAS_DELTA=delta is not None, ROUND_INPUT=round_input, BLOCK=_next_pow2(hidden),
                    ZERO_BLOCK=0 if zero is None else _next_pow2(zero.shape[1]), **_pdl_args(pdl))
    return out


def causal_conv_silu_xproj(x: torch.Tensor, state: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None, out: torch.Tensor, x_proj: torch.Tensor, acc: torch.Tensor,
                           block_d: int = 64, pdl: bool = False, join_rows: bool = False) -> torch.Tensor:
    """One decode token: conv + SiLU from ``state[rows]`` (in place) and x_proj of the result, in one launch.

    x, out: (B, D) unit inner stride; x_proj: (P, D); acc: (B, P) fp32, must be zero (``add_rmsnorm``'s
    ``zero``); each channel block adds its share of x_proj (split-K), so the skinny x_proj GEMM (N = 192,
    latency-bound: ~7 us per layer on an H100) disappears into the conv kernel. ``join_rows`` (two rows):
    both rows' shares reduced together and added with one atomic per output and row pair.
    """
    kernel = _kernels().conv4_silu_xproj
    batch, d_inner = x.shape
    n_proj = x_proj.shape[0]
    if state.shape[-1] != 4 or x.stride(-1) != 1 or out.stride(-1) != 1 or x_proj.stride(-1) != 1:
        raise ValueError("causal_conv_silu_xproj: needs conv width 4 and unit inner strides.")
    kernel[(triton_cdiv(d_inner, block_d),)](x, state, rows, weight, bias if bias is not None else weight, out,
                                             x_proj, acc, d_inner, n_proj, x.stride(0), state.stride(0),
                                             state.stride(1), out.stride(0), x_proj.stride(0), acc.stride(0),
                                             BATCH=batch, HAS_BIAS=bias is not None, BLOCK_D=block_d,
                                             JOIN=join_rows and batch == 2,
                                             PROJ_BLOCK=_next_pow2(n_proj), **_pdl_args(pdl))
    return acc


def causal_conv_silu(x: torch.Tensor, state: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, out: torch.Tensor, block_d: int = 256,
                     new_rows: torch.Tensor | None = None, snap_rows: torch.Tensor | None = None,
                     snap_pos: torch.Tensor | None = None, pdl: bool = False,
                     end_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Width-4 causal depthwise conv + SiLU of a chunk continuing from ``state[rows]`` (updated in place).

    x, out: (B, L, D) with unit stride on D (views of in_proj output are fine); state: (R, D, 4);
    rows: (B,) int64 row of each batch entry in ``state``; weight: (D, 4). ``new_rows``: where the final
    state goes (default ``rows``); ``snap_pos`` (B,) int64: for a row with a position p in 1..L-1 the
    state after its first p inputs also goes to ``snap_rows`` (which may be ``rows``, not ``new_rows``);
    0: no snapshot for that row. ``end_pos`` (B,) int64: each row's real length (1..L; right padding beyond
    it): its final state is the one after end_pos inputs.
    """
    kernel = _kernels().conv4_silu
    batch, seq_len, d_inner = x.shape
    if state.shape[-1] != 4 or state.stride(-1) != 1 or x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"causal_conv_silu: needs conv width 4 and unit inner strides; got state "
                         f"{tuple(state.shape)} strides {state.stride()}, x strides {x.stride()}.")
    new_rows, snap_rows, snap_pos = _snapshot_args(rows, new_rows, snap_rows, snap_pos)
    grid = (batch, triton_cdiv(d_inner, block_d))
    block_l = max(1, min(_next_pow2(seq_len), 2048 // block_d))  # positions per tile, <= 2048 elements
    kernel[grid](x, state, rows, new_rows, snap_rows, snap_pos, rows if end_pos is None else end_pos, weight,
                 bias if bias is not None else weight, out, seq_len, d_inner, x.stride(0), x.stride(1),
                 state.stride(0), state.stride(1), out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
                 HAS_SNAP=snap_pos is not rows, HAS_END=end_pos is not None, BLOCK_D=block_d, BLOCK_L=block_l,
                 **_pdl_args(pdl))
    return out


def selective_scan_rows(x, dt_low, dt_weight, dt_bias, A, B, C, D, z, state, rows, out, block_d: int = 32,
                        dt=None, pdl: bool = False, new_rows=None, snap_rows=None, snap_pos=None, end_pos=None):
    """dt_proj + selective scan of a chunk from ``state[rows]`` (fp32, updated in place), D skip, SiLU(z) gate.

    x, z, out: (B, L, D); dt_low: (B, L, R) low-rank time step (x_proj output, before dt_proj);
    dt_weight: (D, R); B, C: (B, L, N); A: (D, N) fp32 contiguous; state: (R, D, N) fp32;
    rows: (B,) int64. Inner strides must be 1. Pass ``dt`` (B, L, D) = dt_proj(dt_low) to skip the fused
    projection (cheaper for large batches: fused, every (row, channel block) re-reads its W rows).
    ``new_rows`` / ``snap_rows`` / ``snap_pos`` / ``end_pos``: as ``causal_conv_silu`` (a padded position
    has time step 0, so the state after it is the state before).
    """
    kernel = _kernels().selective_scan
    batch, seq_len, d_inner = x.shape
    n_state, rank = A.shape[1], dt_weight.shape[1]
    for name, t in (("x", x), ("dt_low", dt_low), ("B", B), ("C", C), ("z", z), ("out", out), ("state", state)):
        if t.stride(-1) != 1:
            raise ValueError(f"selective_scan_rows: {name} needs unit inner stride; got {t.stride()}.")
    dt_arg = x if dt is None else dt
    new_rows, snap_rows, snap_pos = _snapshot_args(rows, new_rows, snap_rows, snap_pos)
    grid = (batch, triton_cdiv(d_inner, block_d))
    kernel[grid](x, dt_low, dt_weight, dt_arg, dt_bias, A, B, C, D, z, state, rows, new_rows, snap_rows, snap_pos,
                 rows if end_pos is None else end_pos, out, seq_len, d_inner, rank,
                 x.stride(0), x.stride(1), dt_low.stride(0), dt_low.stride(1), dt_arg.stride(0), dt_arg.stride(1),
                 B.stride(0), B.stride(1), C.stride(0), C.stride(1), z.stride(0), z.stride(1),
                 state.stride(0), state.stride(1), out.stride(0), out.stride(1), N=n_state,
                 RANK_BLOCK=max(16, _next_pow2(rank)), BLOCK_D=block_d, FUSED_DT=dt is None,
                 HAS_SNAP=snap_pos is not rows, HAS_END=end_pos is not None, **_pdl_args(pdl))
    return out


# The split path's decode scan for more than cuda_runtime.FUSED_DT_MAX_BATCH rows, 16 rows x 16 channels
# per program (run P on an H100: batch 8 3.538 -> 3.456 ms, batch 64 5.031 -> 4.992 against a dt_proj
# GEMM + the per-row scan; with 2 warps 3.474 / 5.037, 32 rows with 8 warps 3.668 / 5.164). A row-block
# conv + x_proj on tensor cores (one launch for the conv kernel and the x_proj GEMM) was slower at every
# tile tried (batch 64: 6.6-8.2 ms) and was dropped (docs/performance.md).
ROWS_DECODE_TILES = {"scan": {"block_m": 16, "block_d": 16, "num_warps": 4}}


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 models (Triton's default would be TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def selective_scan_rows_dot(x, dt_low, dt_weight, dt_bias, A, B, C, D, z, state, rows, out, block_m: int = 16,
                            block_d: int = 16, num_warps: int = 4, pdl: bool = False):
    """One decode token of ``selective_scan_rows`` for many rows: x, z, out (B, D); dt_low (B, R);
    B, C (B, N); state (R, D, N) fp32 updated in place at ``rows``. dt_proj runs on tensor cores per
    (block_m rows, block_d channels) program, so its weights are read once per row block, not per row."""
    kernel = _kernels().selective_scan_dot
    batch, d_inner = x.shape
    n_state, rank = A.shape[1], dt_weight.shape[1]
    for name, t in (("x", x), ("dt_low", dt_low), ("B", B), ("C", C), ("z", z), ("out", out), ("state", state)):
        if t.stride(-1) != 1:
            raise ValueError(f"selective_scan_rows_dot: {name} needs unit inner stride; got {t.stride()}.")
    grid = (triton_cdiv(batch, block_m), triton_cdiv(d_inner, block_d))
    kernel[grid](x, dt_low, dt_weight, dt_bias, A, B, C, D, z, state, rows, out, batch, d_inner, rank,
                 x.stride(0), dt_low.stride(0), B.stride(0), C.stride(0), z.stride(0), state.stride(0),
                 state.stride(1), out.stride(0), N=n_state, RANK_BLOCK=max(16, _next_pow2(rank)), BLOCK_M=block_m,
                 BLOCK_D=block_d, PRECISION=_dot_precision(dt_weight.dtype), num_warps=num_warps, **_pdl_args(pdl))
    return out


SKINNY_MAX_ROWS = 64  # rows are one tl.dot tile of 16, 32 or 64


def _block_m(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def _tiles(block_n: int, block_k: int, num_stages: int = 4, splits: int | None = None) -> dict:
    tiles = {"block_n": block_n, "block_k": block_k, "num_warps": 4, "num_stages": num_stages}
    return tiles if splits is None else {**tiles, "splits": splits}


# Tiles of the skinny GEMM measured fastest on an H100 per (N, K, tile height) of the mamba-2.8b layers
# (bench/tune_gemm.py at 2 and 64 rows, bench/results/tune_gemm_H100.log; 32-row tiles take the 64-row
# choice); other shapes use the defaults of ``skinny_config``. Whether a layer uses the skinny kernel
# at all is measured when the runtime is built (cuBLAS wins in_proj and the 64-row out_proj).
SKINNY_TUNED: dict[tuple[int, int, int], dict] = {
    **{(10240, 2560, m): t for m, t in ((16, _tiles(128, 128)), (32, _tiles(32, 64)), (64, _tiles(32, 64)))},
    **{(2560, 5120, m): t for m, t in ((16, _tiles(64, 128, splits=4)), (32, _tiles(32, 64, splits=4)),
                                       (64, _tiles(32, 64, splits=4)))},
    **{(192, 5120, m): t for m, t in ((16, _tiles(64, 128, splits=16)), (32, _tiles(32, 128, splits=16)),
                                      (64, _tiles(32, 128, splits=16)))},
    **{(5120, 160, m): t for m, t in ((16, _tiles(128, 256, 3)), (32, _tiles(64, 256, 3)),
                                      (64, _tiles(64, 256, 3)))},
}


def skinny_config(rows: int, n_out: int, n_in: int, add: bool) -> dict:
    """Tiles (block_n, block_k, num_warps, num_stages) and, with ``add``, K splits of the skinny GEMM."""
    tuned = SKINNY_TUNED.get((n_out, n_in, _block_m(rows)))
    if tuned is not None:
        return dict(tuned)
    if add:
        return {"block_n": 32, "block_k": 128, "num_warps": 4, "num_stages": 4, "splits": 4}
    return {"block_n": 16 if n_out <= 4096 else 32, "block_k": 256 if rows <= 32 else 128, "num_warps": 4,
            "num_stages": 4}


SHARED_MEMORY_BUDGET = 200 * 1024  # bytes per program: an H100 has 227 KB per SM


def _fit_stages(stages: int, block_m: int, block_n: int, block_k: int, x_bytes: int, w_bytes: int) -> int:
    """Pipeline depth whose buffers fit in shared memory: Triton keeps up to ``stages + 1`` (x, W) tile
    pairs (``bench/kernel_regs.py --runtime`` shows 245 KB, over an H100's limit, for 64 x 32 x 256
    tiles at 4 stages, which would fail at launch)."""
    per_stage = block_m * block_k * x_bytes + block_k * block_n * w_bytes
    return max(1, min(stages, SHARED_MEMORY_BUDGET // per_stage - 1))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, pdl: bool = False,
                  config: dict | None = None) -> torch.Tensor:
    """``x @ weight.T`` for at most 64 rows: one pass over the weight, no split-K reduction kernel.

    Why: for a few rows a linear layer is a weight read; cuBLAS picks split-K kernels for some shapes
    (e.g. 2560 x 5120 at ~1.6 TB/s plus a reduction launch on an H100) and cannot overlap the previous
    kernel (``pdl``). x: (..., K) with unit inner stride, at most 64 rows in all; weight: (N, K)
    contiguous; ``config``: tile sizes (default ``skinny_config``).
    """
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    rows, n_out = flat.shape[0], weight.shape[0]
    _check_skinny("skinny_linear", flat, weight)
    if out is None:
        out = torch.empty(rows, n_out, dtype=weight.dtype, device=x.device)  # (M, N)
    config = config or skinny_config(rows, n_out, flat.shape[1], False)
    _launch_skinny(flat, weight, out.view(rows, n_out), 1, False, pdl, config)
    return out.view(*x.shape[:-1], n_out)


def skinny_linear_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, splits: int | None = None,
                       pdl: bool = False, config: dict | None = None) -> torch.Tensor:
    """``out += x @ weight.T`` in fp32 for at most 64 rows, split over K with atomic adds.

    Why: the out_proj of a decode step added straight into the fp32 residual stream: more programs than
    one per output block (the weight read needs them), no split-K reduction kernel, no bf16 delta.
    out: (M, N) fp32; x: (M, K) unit inner stride; weight: (N, K) contiguous; ``splits``: K shares
    (default: the config's, halved until it divides K).
    """
    _check_skinny("skinny_linear_add_", x, weight)
    if out.dtype != torch.float32:
        raise ValueError(f"skinny_linear_add_: out must be fp32 (atomic adds), got {out.dtype}.")
    config = config or skinny_config(x.shape[0], weight.shape[0], x.shape[1], True)
    splits = splits or config.get("splits", 4)
    while x.shape[1] % splits:
        splits //= 2
    _launch_skinny(x, weight, out, splits, True, pdl, config)
    return out


def _check_skinny(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape[0] > SKINNY_MAX_ROWS or x.stride(-1) != 1 or weight.stride(-1) != 1 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: needs <= {SKINNY_MAX_ROWS} rows, unit inner strides and weight (N, {x.shape[1]})"
                         f"; got {tuple(x.shape)} strides {x.stride()}, weight {tuple(weight.shape)}. Use F.linear.")


def _launch_skinny(x, weight, out, splits: int, add: bool, pdl: bool, config: dict) -> None:
    rows, n_in = x.shape
    n_out = weight.shape[0]
    # tl.dot needs K tiles of 16+ (a tiny model's dt_proj has K = 8: masked)
    block_m, block_n = _block_m(rows), config["block_n"]
    block_k = max(16, min(config["block_k"], _next_pow2(n_in // splits)))
    stages = _fit_stages(config["num_stages"], block_m, block_n, block_k, x.element_size(), weight.element_size())
    _kernels().skinny_matmul[(triton_cdiv(n_out, block_n), splits)](
        x, weight, out, rows, n_out, n_in, x.stride(0), weight.stride(0), out.stride(0), n_in // splits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ADD=add, num_warps=config["num_warps"],
        num_stages=stages, **_pdl_args(pdl))


def _snapshot_args(rows, new_rows, snap_rows, snap_pos):
    """(new_rows, snap_rows, snap_pos) for the kernels: in place and no snapshot by default (then
    ``snap_pos`` is ``rows`` itself, a placeholder the kernel never reads: HAS_SNAP is off).

    Positions live on the device (graph replays update them without a sync), so their range (1..L-1, or
    0 for none) is the caller's contract: ``CudaMambaRuntime`` checks it on the host."""
    new_rows = rows if new_rows is None else new_rows
    if snap_pos is None:
        return new_rows, rows, rows
    if snap_rows is None or snap_pos.shape != rows.shape:
        raise ValueError(f"snapshots need snap_rows and one position per row; got snap_pos "
                         f"{tuple(snap_pos.shape)} for {tuple(rows.shape)} rows.")
    if snap_rows.data_ptr() == new_rows.data_ptr():
        raise ValueError("snapshot and final state cannot go to the same rows.")
    return new_rows, snap_rows, snap_pos


def _pdl_args(pdl: bool | str) -> dict:
    """Launch arguments for programmatic dependent launch (PDL): the kernel may start while the previous
    one finishes, loads its weights, then waits (``gdc_wait``) before touching the previous kernel's data.

    ``pdl``: False; True or "early": each program lets the next kernel launch as soon as it starts (the
    fused decode path: its kernels prefetch weights before their wait); "late": only when it exits,
    which hides the next launch's latency without early programs holding SM resources the running
    kernel's later waves need (multi-wave kernels of the split path). Off under Triton's CPU
    interpreter, which has no grid-dependency control."""
    if pdl not in (False, True, "early", "late"):
        raise ValueError(f"pdl={pdl!r}: use False, True/'early' or 'late'.")
    if not pdl or interpreting():
        return {"PDL": False, "PDL_EARLY": False}
    return {"PDL": True, "PDL_EARLY": pdl != "late", "launch_pdl": True}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _split_pow2(n: int) -> tuple[int, int]:
    """(K1, K2): K1 the largest power of two <= n, K2 a power of two covering the rest (0 if none)."""
    k1 = 1 << (int(n).bit_length() - 1)
    return k1, (_next_pow2(n - k1) if n > k1 else 0)


GEMV_MAX_ROWS = 8  # rows are unrolled in the GEMV kernels (one compiled variant per row count)

# Tiles of the fused decode path's kernels per row count, from bench/tune_gemv.py (each kernel alone,
# 64 layers PDL-chained in a CUDA graph) and bench/run_all.py (the whole step) on an H100:
# * in_proj, 1 row: one 8 x 2560 tile per program, 4 warps (19.6 us per layer alone; cuBLAS 21.0). The
#   persistent variant was faster alone (19.0) but not in the step (2.500 against 2.488 ms: it prefetches
#   fewer weights before the PDL wait). 2 rows: persistent, 4 x 2560 tiles, 3 programs per SM, the rows'
#   reductions joined (step 2.81 ms; one tile per program 2.98, persistent unjoined 2 per SM 2.92).
# * conv + x_proj: 64 channels per program for 1 row (3.47 us alone, 32 channels: 3.88; 128 spills);
#   for 2 rows 32 channels with the rows' x_proj reductions joined (step 2.735 against 2.762 ms with 64
#   unjoined, 2.761 with 32 unjoined; joined at 64: 2.78 against 2.77).
# * out_proj: 64 x 256 tiles, 8 warps for 1 row (10.2 us; cuBLAS 14.0); 128 x 128 for 2 (11.8; 14.2),
#   the rows' reductions joined (step 2.77 against 2.81 ms).
# A (rows, block_n, K) 3-D tile for two rows was tried in session 2 and was slower for one and two rows.
FUSED_DECODE_TILES = {
    1: {"in_proj": {"block_n": 8, "num_warps": 4}, "conv": {"block_d": 64},
        "out_proj": {"block_n": 64, "block_k": 256, "num_warps": 8}},
    2: {"in_proj": {"block_n": 4, "num_warps": 4, "programs_per_sm": 3, "join_rows": True},
        "conv": {"block_d": 32, "join_rows": True},
        "out_proj": {"block_n": 128, "block_k": 128, "num_warps": 8, "join_rows": True}},
}


def fused_decode_options(rows: int, device: torch.device, overrides: dict | None = None) -> dict[str, dict]:
    """Keyword arguments of the fused decode path's kernels for ``rows`` rows: {"in_proj": for
    ``rmsnorm_gemv``, "conv": for ``causal_conv_silu_xproj``, "out_proj": for ``gemv_add_``}, from
    ``FUSED_DECODE_TILES`` (rows beyond the table: the 1-row entry) updated with ``overrides[rows]``."""
    base = FUSED_DECODE_TILES.get(rows, FUSED_DECODE_TILES[1])
    extra = (overrides or {}).get(rows, {})
    options = {kernel: {**base.get(kernel, {}), **extra.get(kernel, {})} for kernel in ("in_proj", "conv", "out_proj")}
    per_sm = options["in_proj"].pop("programs_per_sm", None)
    if per_sm is not None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        options["in_proj"]["programs"] = per_sm * sms
    return options


def rmsnorm_gemv(residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                 out: torch.Tensor, zero: torch.Tensor | None = None, block_n: int = 8, num_warps: int = 4,
                 pdl: bool = False, programs: int | None = None, join_rows: bool = False) -> torch.Tensor:
    """``out = RMSNorm(residual) @ weight.T`` for a few rows: a decode step's norm fused into its in_proj.

    residual: (M, H) fp32; norm_weight: (H,); weight: (N, H) contiguous; out: (M, N) in the weight dtype.
    Each program holds a (block_n, H) weight tile in registers and recomputes the row norms (H floats from
    L2), so the norm costs no launch and, with ``pdl``, the weight read overlaps the previous kernel.
    ``zero`` (M, P) fp32, optional, is cleared (the accumulator of ``causal_conv_silu_xproj``).
    ``programs``: run the persistent variant (1 or 2 rows) on that many programs, each normalising the
    rows once and looping over output tiles (the next tile's weights loaded before this one's dot);
    ``join_rows``: two rows' products reduced together (one cross-warp exchange per tile).
    """
    _check_gemv("rmsnorm_gemv", residual, weight, out)
    rows, hidden = residual.shape
    n_out = weight.shape[0]
    k1, k2 = _split_pow2(hidden)
    tiles = triton_cdiv(n_out, block_n)
    if programs is None:
        kernel, grid, options = _kernels().rmsnorm_gemv, tiles, {}
    else:
        if rows > 2:
            raise ValueError(f"rmsnorm_gemv: the persistent variant (programs=...) takes 1 or 2 rows, got {rows}.")
        kernel, grid = _kernels().rmsnorm_gemv_loop, min(tiles, programs)
        options = {"JOIN": join_rows and rows == 2}
    kernel[(grid,)](
        residual, norm_weight, weight, out, residual if zero is None else zero, n_out, hidden,
        0 if zero is None else zero.shape[1], residual.stride(0), weight.stride(0), out.stride(0),
        0 if zero is None else zero.stride(0), eps, ROWS=rows, BLOCK_N=block_n, K1=k1, K2=k2,
        ZERO_BLOCK=0 if zero is None else _next_pow2(zero.shape[1]), num_warps=num_warps, **options,
        **_pdl_args(pdl))
    return out


def gemv_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, block_n: int = 64, block_k: int = 256,
              num_warps: int = 8, pdl: bool = False, join_rows: bool = False) -> torch.Tensor:
    """``out += x @ weight.T`` in fp32 for a few rows; each program adds one (block_n, block_k) tile's share
    with atomics (split-K), its weight tile loaded before the ``pdl`` wait.

    out: (M, N) fp32 (the residual stream); x: (M, K); weight: (N, K) contiguous. Tiles default to the
    best for one row on an H100 (``FUSED_DECODE_TILES``); ``join_rows`` (two rows): both rows' products
    reduced together and added with one atomic per output and row pair.
    """
    kernel = _kernels().gemv_add
    _check_gemv("gemv_add_", x, weight, out)
    rows, n_in = x.shape
    n_out = weight.shape[0]
    block_k = min(block_k, _next_pow2(n_in))
    kernel[(triton_cdiv(n_out, block_n), triton_cdiv(n_in, block_k))](
        x, weight, out, n_out, n_in, x.stride(0), weight.stride(0), out.stride(0), ROWS=rows, BLOCK_N=block_n,
        BLOCK_K=block_k, JOIN=join_rows and rows == 2, num_warps=num_warps, **_pdl_args(pdl))
    return out


def _check_gemv(name: str, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """The GEMV kernels' input contract: (M <= GEMV_MAX_ROWS, K) rows, (N, K) weight, unit inner strides."""
    rows, n_in = x.shape
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or out.stride(-1) != 1 or weight.shape[1] != n_in \
            or rows > GEMV_MAX_ROWS:
        raise ValueError(f"{name}: needs <= {GEMV_MAX_ROWS} rows, unit inner strides and weight (N, {n_in}); "
                         f"got input {tuple(x.shape)} strides {x.stride()}, weight {tuple(weight.shape)}.")


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
