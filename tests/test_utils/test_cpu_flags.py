from poolformer_mm.utils.cpu_flags import cpu_flags, machine_description

CPUINFO = '''processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
'''


def test_machine_description_names_the_model_and_its_matrix_flags(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(CPUINFO)
    assert cpu_flags(str(cpuinfo)) >= {'avx2', 'avx512_bf16'}
    assert machine_description(str(cpuinfo)) == 'AMD EPYC 9R14 (avx2 avx512f avx512_bf16)'


def test_machine_description_without_cpuinfo_says_so(tmp_path):
    assert cpu_flags(str(tmp_path / 'missing')) is None
    assert machine_description(str(tmp_path / 'missing')) == (
        'unknown CPU (no AVX2/AVX-512/AMX flags)')
