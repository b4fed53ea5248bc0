"""Helpers shared by the tests; each module has one job. Import from the
module, e.g. `from tests.helpers.ports import free_port`.

paths      ROOT (the checkout) and AUDIO_DIR (../shared/audio)
ports      free_port(), wait_listening(port)
servers    server_process(script, port), json_logs(proc): servers in a subprocess
tls        make_tls_files(directory): a throwaway CA and a 127.0.0.1 certificate
devices    DEVICES_TOML and write_devices(directory): the devices allowlist file
           (the `devices_file` fixture in tests/conftest.py writes it)
clocks     FakeClock: a clock that moves only when told or slept on
recorders  EventRecorder: the `send` callback of a session, waitable
waiting    until(check): poll a condition, bounded
stores     MemoryStore: store.Store's interface in memory, failing or slow on demand
speech     voiced_fraction(), as_pcm16(): checks for spoken audio
engines    collect(handle), DecodeGate, EngineFactory: for the engine tests
postgres   PostgresServer (the `postgres_server` fixture in tests/conftest.py)
mosquitto  start_mosquitto(), write_passwords(), MOSQUITTO: a real broker
processes  cli_process(), until_http_ok(), stop_process(): `voice-agent` as a child
tts        ToneTTS(seconds): a fake TTS engine with exact sample counts
browser    chromium(mic), make_fake_mic(), PageWatch, tid(), page readers: headless Chromium
"""
