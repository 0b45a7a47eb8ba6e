"""The answer's Opus line asks for in-band FEC, whatever else it says."""

from server.media.opus_sdp import with_opus_fec

ANSWER = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\na=ssrc:1 cname:x\r\n"


def test_fec_is_added_where_there_is_no_fmtp():
    out = with_opus_fec(ANSWER)
    assert "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n" in out
    assert out.endswith("\r\n") and out.count("a=fmtp:") == 1


def test_an_existing_fmtp_keeps_its_parameters_and_gets_fec_once():
    sdp = ANSWER.replace("a=ssrc", "a=fmtp:111 minptime=10;useinbandfec=0;stereo=1\r\na=ssrc")
    out = with_opus_fec(sdp)
    assert "a=fmtp:111 minptime=10;stereo=1;useinbandfec=1\r\n" in out and out.count("a=fmtp:") == 1


def test_other_codecs_are_left_alone():
    sdp = "v=0\nm=audio 9 RTP/AVP 0\na=rtpmap:0 PCMU/8000\n"
    assert with_opus_fec(sdp) == sdp
